"""The results row's one definition (dtype_bench.results.ResultRow): what reads and writes rows derives from it,
README's schema table is generated from it, and both experiments' run.py write only its fields."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

import tiny_run
from dtype_bench import results

LM_SMALL = ["--preset", "tiny", "--n_layer", "1", "--n_head", "1", "--n_embd", "64", "--block_size", "32",
            "--batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "2", "--eval_steps", "2",
            "--eval_sequences", "8", "--timing_warmup_steps", "1", "--diagnostics_every", "1", *tiny_run.PINNED]
CLS_SMALL = [*tiny_run.SMALL, "--max_steps", "2", "--eval_steps", "2", "--timing_warmup_steps", "1",
             "--diagnostics_every", "1"]


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]


def test_readme_schema_table_is_the_generated_one():
    readme = results.README.read_text(encoding="utf-8")
    assert results.readme_with_schema(readme) == readme, (
        "README's results schema differs from dtype_bench.results.ResultRow: "
        "run `python -m dtype_bench.results --readme`")
    assert results.schema_table() in readme


def test_every_field_has_a_docstring_and_a_json_type():
    docs = results.field_docs()
    assert list(docs) == list(results.FIELD_TYPES) and all(docs.values())
    assert results.REQUIRED == ("run_id", "status")
    table = results.schema_table().splitlines()
    assert len(table) == 2 + len(docs)
    assert "| `samples_per_second` | number or null |" in results.schema_table()


def test_a_changed_definition_makes_the_readme_check_fail():
    readme = results.README.read_text(encoding="utf-8")
    edited = readme.replace("| `seed` | integer |", "| `seed` | string |")
    assert edited != readme and results.readme_with_schema(edited) != edited
    with pytest.raises(ValueError, match="no schema section"):
        results.readme_with_schema("# a README without the markers\n")


def test_types_come_from_the_definition():
    good = {"run_id": "r1", "status": "completed", "seed": 0, "samples_per_second": 3, "compiled": False}
    assert results.row_problem(good) is None  # an integer is a JSON number
    assert results.row_problem({**good, "seed": True}) == "seed is bool, not int"
    assert results.row_problem({**good, "samples_per_second": "fast"}) == "samples_per_second is str, not float or null"
    assert results.row_problem({**good, "samples_per_second": None}) is None
    assert results.row_problem({**good, "steps": None}) == "steps is NoneType, not int"
    assert results.row_problem({**good, "compiled": 1}) == "compiled is int, not bool"
    assert results.row_problem({**good, "written_by_another_version": 1}) is None  # read and kept
    assert results.row_problem({"status": "completed"}) == "no run_id"


def test_a_field_the_definition_lacks_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown fields samples_per_sec"):
        results.append_result(tmp_path, {"run_id": "r1", "status": "completed", "samples_per_sec": 1.0})
    with pytest.raises(ValueError, match="seed is str"):
        results.append_result(tmp_path, {"run_id": "r1", "status": "completed", "seed": "0"})
    assert not (tmp_path / "results.jsonl").exists()
    with pytest.raises(ValueError, match="not fields of a results row"):
        results.row_fields(steps=1, stepz=2)
    assert results.row_fields(steps=1) == {"steps": 1}


def test_schema_command_prints_the_table(capsys):
    assert results.main([]) == 0
    assert capsys.readouterr().out.strip() == results.schema_table()


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory) -> Path:
    from experiments.lm import prepare_data

    return prepare_data.prepare("synthetic", tmp_path_factory.mktemp("lm") / "cache", tokenizer="bpe:512",
                                val_fraction=0.1, synthetic_docs=60)


@pytest.mark.parametrize("experiment", ["classification", "lm"])
def test_run_py_rows_hold_only_defined_fields_of_their_types(experiment, small_cache_dir, lm_cache, tmp_path):
    """A completed and a skipped (float8 needs a GPU) row of each experiment's main, in this process."""
    if experiment == "lm":
        from experiments.lm.run import main
        flags, cache = LM_SMALL, lm_cache
    else:
        from experiments.classification.run import main
        flags, cache = CLS_SMALL, small_cache_dir
    out = tmp_path / "out"
    for config in ("amp_bf16", "amp_bf16_fp8"):
        assert main([*flags, "--data_dir", str(cache), "--output_dir", str(out), "--config", config]) == 0
    completed, skipped = rows(out)
    assert (completed["status"], skipped["status"]) == ("completed", "skipped") and "float8" in skipped["reason"]
    for row in (completed, skipped):
        assert results.unknown_fields(row) == [] and results.row_problem(row) is None
    assert completed["diagnostics_measured_steps"] >= 1 and completed["static_memory_bytes"]["weights"]["total"] > 0


def _main_with_train_one(monkeypatch, tmp_path, small_cache_dir, train_one):
    from experiments.classification import run

    monkeypatch.setattr(run, "train_one", train_one)
    out = tmp_path / "out"
    code = run.main([*CLS_SMALL, "--data_dir", str(small_cache_dir), "--output_dir", str(out), "--config", "amp_bf16"])
    return code, rows(out)


def test_main_calls_train_one_itself(monkeypatch, tmp_path, small_cache_dir):
    """`--config amp_bf16` reaches train_one from main() directly: no frame of a framework in between."""
    callers = []

    def train_one(*args):
        callers.extend(f.function for f in inspect.stack()[1:3])
        return {"status": "completed", "steps": 0}

    code, (row,) = _main_with_train_one(monkeypatch, tmp_path, small_cache_dir, train_one)
    assert code == 0 and row["status"] == "completed"
    assert callers[0] == "main", callers


def test_fields_outside_the_definition_make_a_failed_row_that_says_so(monkeypatch, tmp_path, small_cache_dir, capsys):
    code, (row,) = _main_with_train_one(monkeypatch, tmp_path, small_cache_dir,
                                        lambda *args: {"status": "completed", "steps": 2, "val_f1": 0.5})
    assert code == 1 and row["status"] == "failed" and "unknown fields val_f1" in row["error"]
    assert row["config"] == "amp_bf16" and "steps" not in row
    assert "results row refused" in capsys.readouterr().err


def test_a_run_that_raises_is_a_failed_row_with_its_error(monkeypatch, tmp_path, small_cache_dir, capsys):
    def train_one(*args):
        raise RuntimeError("out of patience")

    code, (row,) = _main_with_train_one(monkeypatch, tmp_path, small_cache_dir, train_one)
    assert code == 1 and row["status"] == "failed" and row["error"] == "RuntimeError: out of patience"
    assert isinstance(row["wall_seconds"], float) and "Traceback" in capsys.readouterr().err
