"""Measurement: retrieval metrics, yes/no/maybe QA, cited-answer checks, and the FT-vs-PEFT comparison.

Modules:
    metrics     recall@k, MRR, nDCG@10, accuracy and macro-F1 as plain functions
    datasets    PubMedQA and JSONL evaluation sets; PubMedQA as training data
    retrieval   retrieval evaluation over an index built from a dataset's passages
    qa          constrained yes/no/maybe answering by option log-likelihood
    answers     citation validity, supported sentences and abstention of `Assistant.ask`
    scoring     held-out loss, perplexity and ROUGE-L of a causal LM
    canaries    synthetic identifiers inserted into training data; exposure and extraction
    compare     trains each method on the same budget and measures quality, cost and privacy
    report      report.md, report.json and PNG plots of a comparison
"""
