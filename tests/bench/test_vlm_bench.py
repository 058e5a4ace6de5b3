"""``diffboost bench --vlm`` on a tiny saved LLaVA."""

import csv

import pytest

from diffboost.bench import vlm as vlm_bench
from diffboost.cli import main as cli_main
from factories import make_llava


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    model, processor = make_llava(seed=0, image_size=64)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_rows_files_and_honest_ratios(saved_llava, tmp_path):
    rows, workload = vlm_bench.run(saved_llava, methods=("HiPrune", "Downsample", "FastV"), budgets=(0.25,),
                                   questions=8, timed=1, repeats=1, decode_tokens=2)
    assert [r.name for r in rows] == ["none", "HiPrune 25%", "Downsample 25%", "FastV 25%"]
    base = rows[0]
    assert base.kept_tokens == 256 and base.ttft_speedup == 1.0 and base.agreement == 1.0
    assert all(0.0 <= r.agreement <= 1.0 for r in rows)
    for r in rows[1:]:
        assert r.kept_tokens == 64
        assert r.retained == pytest.approx(r.accuracy["all"] / base.accuracy["all"]) if base.accuracy["all"] else True
        assert r.ttft_s > 0 and r.decode_tok_s > 0
    assert rows[1].prefill_tokens == base.prefill_tokens - 192  # the language model sees 192 tokens fewer
    files = vlm_bench.write_all(rows, workload, tmp_path / "out")
    with open(files["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [t["name"] for t in table] == [r.name for r in rows]
    assert "| `HiPrune 25%` | 64 |" in files["md"].read_text()


def test_cli_refuses_bad_input_before_work(saved_llava, tmp_path, caplog):
    assert cli_main(["bench", "--vlm", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a model folder" in caplog.text
    assert cli_main(["bench", "--vlm", "--model", str(saved_llava), "--methods", "ToMe", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method(s) ['ToMe']" in caplog.text
    assert cli_main(["bench", "--vlm", "--model", str(saved_llava), "--budgets", "0,0.5", "--out", str(tmp_path / "o")]) == 2
    assert "budgets must be shares in (0, 1]" in caplog.text


def test_cli_refuses_bad_budgets_and_unwritable_out(saved_llava, tmp_path, caplog):
    assert cli_main(["bench", "--vlm", "--model", str(saved_llava), "--budgets", "abc", "--out", str(tmp_path / "o")]) == 2
    assert "--budgets 'abc': give comma-separated shares" in caplog.text
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["bench", "--vlm", "--model", str(saved_llava), "--out", str(blocker / "sub")]) == 2
    assert "cannot create the output folder" in caplog.text
