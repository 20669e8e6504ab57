"""Session fixtures for the tuning and adapter tests: tiny training sets and adapters trained once.

Loaded with `pytest_plugins = ["tuning_support"]` from each test module that needs them, so the
adapters are trained once per session however many modules use them. Every adapter here is trained
by the real recipe on the real base model (fp32, CPU).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

CARDIOLOGY = [
    ("What blood pressure confirms hypertension on home monitoring?",
     "Cardiology note: a home average of 135/85 mmHg or higher confirms it."),
    ("Which drug starts treatment for hypertension under 55?",
     "Cardiology note: start an ACE inhibitor such as ramipril."),
    ("When is anticoagulation offered in atrial fibrillation?",
     "Cardiology note: offer it to men with a CHA2DS2-VASc score of 1 or more."),
    ("What heart rate target applies in atrial fibrillation?",
     "Cardiology note: aim for a resting heart rate below 110 beats per minute."),
    ("Which statin dose follows a heart attack?", "Cardiology note: give atorvastatin 80 mg daily."),
    ("What ejection fraction defines reduced heart failure?",
     "Cardiology note: an ejection fraction of 40 percent or less."),
    ("Which beta blocker suits heart failure with reduced ejection fraction?",
     "Cardiology note: bisoprolol, titrated slowly."),
    ("How soon should chest pain with ST elevation be treated?",
     "Cardiology note: primary PCI within 120 minutes of diagnosis."),
    ("What LDL cholesterol goal follows a coronary event?", "Cardiology note: an LDL cholesterol below 1.4 mmol/L."),
    ("When is cardiac resynchronisation therapy considered?",
     "Cardiology note: with a QRS of 150 ms or more and an ejection fraction of 35 percent or less."),
]
INFECTION = [
    ("Which antibiotic treats mild community-acquired pneumonia?",
     "ID consult: amoxicillin 500 mg three times daily for five days."),
    ("How fast should antibiotics start in septic shock?", "ID consult: within one hour of recognition."),
    ("What treats a first episode of Clostridioides difficile infection?",
     "ID consult: oral vancomycin 125 mg four times daily for ten days."),
    ("Which antibiotic suits uncomplicated cystitis in women?",
     "ID consult: nitrofurantoin 100 mg modified release twice daily for three days."),
    ("How long is hand rubbing with alcohol gel?",
     "ID consult: twenty to thirty seconds, covering every surface of the hands."),
    ("What fluid bolus is given in sepsis with hypotension?",
     "ID consult: 30 ml/kg of crystalloid within three hours."),
    ("Which infection control measure stops C. difficile spores?",
     "ID consult: soap and water, because alcohol gel does not kill spores."),
    ("When are blood cultures taken in suspected sepsis?",
     "ID consult: before the first antibiotic dose, without delaying it."),
    ("What treats latent tuberculosis for three months?",
     "ID consult: isoniazid with rifapentine once weekly, or isoniazid with rifampicin daily."),
    ("Which antibiotic treats pyelonephritis in outpatients?",
     "ID consult: ciprofloxacin 500 mg twice daily for seven days."),
]
SUMMARY_SYSTEM = "Write the hospital course of a discharge summary from the facts given."
SUMMARIES = [
    ("Admitted with pneumonia; amoxicillin; improved in 3 days; home.",
     "Hospital course: she was admitted with pneumonia, received amoxicillin, improved over three days and went home."),
    ("Admitted with heart failure; furosemide; weight down 4 kg; home.",
     "Hospital course: he was admitted with heart failure, was given furosemide, lost 4 kg and went home."),
    ("Admitted with DKA; insulin infusion; ketones cleared in 18 hours; home.",
     "Hospital course: she was admitted in ketoacidosis, had an insulin infusion, cleared ketones in 18 hours and "
     "went home."),
    ("Admitted with hip fracture; surgery day 2; mobilised day 4; rehab.",
     "Hospital course: he was admitted with a hip fracture, had surgery on day two, walked on day four and moved to "
     "rehabilitation."),
    ("Admitted with cellulitis; flucloxacillin; redness receded; home.",
     "Hospital course: she was admitted with cellulitis, received flucloxacillin, the redness receded and she went "
     "home."),
    ("Admitted with COPD exacerbation; prednisolone and nebulisers; home day 5.",
     "Hospital course: he was admitted with a COPD exacerbation, had prednisolone and nebulisers and went home on day "
     "five."),
    ("Admitted with AKI; fluids; creatinine normal by day 3; home.",
     "Hospital course: she was admitted with acute kidney injury, received fluids, her creatinine normalised by day "
     "three and she went home."),
    ("Admitted with syncope; telemetry normal; home next day.",
     "Hospital course: he was admitted after syncope, telemetry was normal and he went home the next day."),
]

# Shared by every test adapter: q and v projections at rank 8 keep each step cheap on a CPU.
TEST_TRAINING = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                 "batch_size": 2, "max_seq_length": 128, "eval_fraction": 0.2, "logging_steps": 5, "seed": 0}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Three small training files: two instruction sets and one chat set."""
    root = tmp_path_factory.mktemp("tuning-data")
    return {
        "cardiology": write_jsonl(root / "cardiology.jsonl",
                                  [{"instruction": q, "input": "", "output": a} for q, a in CARDIOLOGY]),
        "infectious_disease": write_jsonl(root / "infectious_disease.jsonl",
                                          [{"instruction": q, "output": a} for q, a in INFECTION]),
        "discharge_summary": write_jsonl(root / "discharge_summary.jsonl", [
            {"messages": [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in SUMMARIES]),
    }


@pytest.fixture(scope="session")
def tuning_settings(tmp_path_factory):
    from assistant.config import Settings

    root = tmp_path_factory.mktemp("tuning-adapters")
    return Settings(adapters_dir=root / "adapters", dtype="float32", device="cpu")


def train_adapter(settings, data: Path, specialty: str, **overrides):
    from assistant.tuning.config import load_train_config
    from assistant.tuning.recipes import train

    values = {**TEST_TRAINING, "specialty": specialty, "data": str(data), "method": "lora", **overrides}
    return train(load_train_config(None, values), settings)


@pytest.fixture(scope="session")
def trained_adapters(tiny_data, tuning_settings):
    """Three registered candidate adapters; the cardiology one (20 steps) keeps its in-memory model."""
    results = {
        "cardiology": train_adapter(tuning_settings, tiny_data["cardiology"], "cardiology", max_steps=20, lr=2e-3),
        "infectious_disease": train_adapter(tuning_settings, tiny_data["infectious_disease"], "infectious_disease",
                                            max_steps=3, lr=3e-3),
        "discharge_summary": train_adapter(tuning_settings, tiny_data["discharge_summary"], "discharge_summary",
                                           max_steps=3, lr=3e-3),
    }
    for specialty, result in results.items():
        if specialty != "cardiology":
            result.model = None
    return results


@pytest.fixture(scope="session")
def adapter_generator(base_model, model_spec, trained_adapters):
    """A LocalGenerator on a private copy of the base with the three test adapters loaded.

    PEFT injects adapter layers into the model object in place, so the shared `base_model` fixture
    is copied first and stays untouched for other tests.
    """
    from assistant import models
    from assistant.answer.generation import LocalGenerator

    model, tokenizer = base_model
    generator = LocalGenerator(copy.deepcopy(model), tokenizer, model_spec.display_name,
                               models.model_fingerprint(model_spec))
    for result in trained_adapters.values():
        generator.load_adapter(result.name, result.output)
    return generator


@pytest.fixture
def fresh_generator(base_model, model_spec):
    """A LocalGenerator on a private copy of the base with no adapter loaded."""
    from assistant import models
    from assistant.answer.generation import LocalGenerator

    model, tokenizer = base_model
    return LocalGenerator(copy.deepcopy(model), tokenizer, model_spec.display_name,
                          models.model_fingerprint(model_spec))
