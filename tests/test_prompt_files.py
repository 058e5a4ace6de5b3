"""diffboost.prompt_files: every row checked on its own, whole-file problems raised."""

import pytest

from diffboost.limits import InputError
from diffboost.prompt_files import check_row, pipeline_call_args, read_rows

CALL = {"prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "generator",
        "max_sequence_length", "num_frames", "latents"}


def test_csv_rows_with_types_extras_and_errors(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text('prompt,seed,size,guidance,num_frames,negative_prompt\n'
                 'a red circle,1,64,2.5,9,\n'
                 '"a, b",,,,5,ugly\n'
                 'x,1.5,,,,\n'
                 'y,1,64,,,,extra cell\n'
                 '\n'
                 'z,,,nan,,\n')
    rows = read_rows(f, CALL)
    assert [r.number for r in rows] == [2, 3, 4, 5, 7]
    assert rows[0].settings == {"prompt": "a red circle", "seed": 1, "height": 64, "width": 64, "guidance": 2.5,
                                "extra": {"num_frames": 9}}
    assert rows[1].settings == {"prompt": "a, b", "negative_prompt": "ugly", "extra": {"num_frames": 5}}
    assert "r.csv:4: 'seed' must be an integer, got '1.5'" in rows[2].error
    assert "r.csv:5: 7 cells but 6 columns" in rows[3].error
    assert "r.csv:7: 'guidance' must be a finite number" in rows[4].error


def test_row_checks_name_the_row_and_what_is_allowed():
    with pytest.raises(InputError, match="f:3: give both 'height' and 'width'"):
        check_row({"prompt": "x", "height": 64}, "f:3", CALL)
    with pytest.raises(InputError, match="give 'size' or 'height'/'width', not both"):
        check_row({"prompt": "x", "size": 64, "height": 64, "width": 64}, "f:3", CALL)
    with pytest.raises(InputError, match="unknown key 'cfg'; allowed: prompt, .*max_sequence_length, num_frames"):
        check_row({"prompt": "x", "cfg": 1}, "f:3", CALL)
    with pytest.raises(InputError, match="'latents' is set by diffboost"):
        check_row({"prompt": "x", "latents": [0]}, "f:3", CALL)
    with pytest.raises(InputError, match="'negative_prompt' must be text"):
        check_row({"prompt": "x", "negative_prompt": 3}, "f:3", CALL)
    with pytest.raises(InputError, match="'size' 20 px is not a multiple of 8"):
        check_row({"prompt": "x", "size": 20}, "f:3", CALL)
    # without the pipeline's arguments, extra keys are kept unchecked
    assert check_row({"prompt": " x ", "whatever": 1}, "f:1")["extra"] == {"whatever": 1}


def test_whole_file_problems_raise(tmp_path):
    with pytest.raises(InputError, match="unknown type '.yaml'"):
        (tmp_path / "p.yaml").write_text("a")
        read_rows(tmp_path / "p.yaml")
    (tmp_path / "h.csv").write_text("text,seed\nx,1\n")
    with pytest.raises(InputError, match="h.csv:1: the first row must name the columns, one of them 'prompt'"):
        read_rows(tmp_path / "h.csv")
    (tmp_path / "e.txt").write_text("# only a comment\n\n")
    with pytest.raises(InputError, match="holds no prompts"):
        read_rows(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.txt")


def test_pipeline_arguments_come_from_the_folder_without_loading(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    args = pipeline_call_args(tmp_path)
    assert {"prompt", "max_sequence_length", "true_cfg_scale"} <= args
    (tmp_path / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    assert pipeline_call_args(tmp_path) is None


def test_text_and_jsonl_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa red circle\r\n# a comment\n\n  a blue square  \nun cercle \xe9\n".encode("utf-8")[:-3]
                  + b"\xe9\n")
    rows = read_rows(f)
    assert [(r.number, r.settings.get("prompt"), r.error is None) for r in rows] == [
        (1, "a red circle", True), (4, "a blue square", True), (5, None, False)]
    assert "p.txt:5: not UTF-8 text (byte 0xe9 at column 11)" in rows[2].error
    f.write_text("only one line")  # no final newline
    assert [r.settings["prompt"] for r in read_rows(f)] == ["only one line"]
    j = tmp_path / "p.JSONL"  # the suffix in any case
    j.write_text('{"prompt": "x", "seed": 3}\n{oops\n[1]\n\n# comments are skipped here too\n{"prompt": "y"}\n')
    rows = read_rows(j)
    assert [r.number for r in rows] == [1, 2, 3, 6]
    assert rows[0].settings == {"prompt": "x", "seed": 3} and rows[3].settings == {"prompt": "y"}
    assert "p.JSONL:2: not valid JSON" in rows[1].error
    assert "p.JSONL:3: each JSON line must be an object" in rows[2].error


def test_csv_cells_keep_their_kinds(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("prompt,negative_prompt,steps,height,width,guidance,max_sequence_length,latents_note\n"
                 " 7 ,0,12,64,32,3,16,text value\n")
    (row,) = read_rows(f, CALL | {"latents_note"})
    assert row.settings == {"prompt": "7", "negative_prompt": "0", "steps": 12, "height": 64, "width": 32,
                            "guidance": 3.0, "extra": {"latents_note": "text value", "max_sequence_length": 16}}
    for header in ("prompt,prompt\n", "prompt,\n"):
        f.write_text(header + "x,y\n")
        with pytest.raises(InputError, match="r.csv:1: column names must be unique and not empty"):
            read_rows(f)
    f.write_text("prompt,size\nx,big\ny,64\n")
    rows = read_rows(f)
    assert "'size' must be an integer number of pixels, got 'big'" in rows[0].error
    assert rows[1].settings["height"] == rows[1].settings["width"] == 64
    f.write_text("prompt\n")  # a header and no row
    with pytest.raises(InputError, match="holds no prompts"):
        read_rows(f)


def test_extra_values_must_be_scalars_or_lists_of_them():
    for good in (1, 2.5, "x", True, None, [1, "a", False], []):
        assert check_row({"prompt": "p", "max_sequence_length": good}, "f:1", CALL)["extra"] == {
            "max_sequence_length": good}
    for bad in ({"a": 1}, [[1]], [None], [{"a": 1}]):
        with pytest.raises(InputError, match="'max_sequence_length' must be a number, text, true/false or a list"):
            check_row({"prompt": "p", "max_sequence_length": bad}, "f:1", CALL)
    assert check_row({"prompt": "p", "num_frames": 9}, "f:1", CALL)["extra"] == {"num_frames": 9}
    for bad, why in ((100_000, "out of range; allowed: 1 to 1024"), (0, "out of range"), (2.5, "must be an integer")):
        with pytest.raises(InputError, match=f"f:1: 'num_frames' .*{why}"):
            check_row({"prompt": "p", "num_frames": bad}, "f:1", CALL)
