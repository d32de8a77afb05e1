"""A bad input file (not UTF-8, not JSON, truncated) or a model.name that names nothing: one error that
names the file (or model.name) and what to do, at once, and one line from the CLI."""

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from decomp_jax.app import cli
from decomp_jax.data import commonsense, glue, math as mathdata
from decomp_jax.guards import FileFormatError
from decomp_jax.interop import peft
from decomp_jax.models import convert, hf

from conftest import DATA, REPO

QUICK = str(REPO / "configs" / "quickstart.yaml")


def not_utf8(path: Path, text: str, line: int) -> Path:
    """``text`` written to ``path`` with a 0xff byte at the start of line ``line`` (1-based)."""
    lines = text.encode().split(b"\n")
    lines[line - 1] = b"\xff" + lines[line - 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines))
    return path


def sst2(folder: Path, bad: str = "") -> Path:
    """An SST-2 folder with the first 40 rows of each split; ``bad``: the split file given a 0xff byte."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        head = "".join((DATA / "glue" / "SST-2" / f"{split}.tsv").read_text().splitlines(keepends=True)[:41])
        (folder / f"{split}.tsv").write_text(head)
        if split == bad:
            not_utf8(folder / f"{split}.tsv", head, 3)
    return folder


def one_line(capsys, text: str) -> str:
    """The CLI's stderr: one line holding ``text``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("decomp-jax: error: ") and text in err, err
    return err


# -- data ------------------------------------------------------------------------------------------


def test_a_glue_tsv_that_is_not_utf8_names_the_file_line_and_fix(tmp_path, capsys):
    folder = sst2(tmp_path / "SST-2", bad="train")
    train = folder / "train.tsv"
    fix = r"re-save it as UTF-8, or download the GLUE data again\.$"
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(train))} is not UTF-8 text: byte 0xff at offset \d+ "
                                              rf"\(line 3\) cannot be decoded; {fix}"):
        glue.load_examples("sst2", "train", path=folder)
    assert len(glue.load_examples("sst2", "validation", path=folder)) == 40  # the good file reads as before
    code = cli.main(["train", QUICK, "--no-progress", "--set", f"data.path={folder}",
                     "--set", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2
    one_line(capsys, f"{train} is not UTF-8 text")


def test_read_tsv_keeps_line_endings_bom_and_quotes_as_before(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes('\ufeffsentence\tlabel\r\nsay "hi\tthere\r\n\r\nit\'s "quoted"\t1\n'.encode())
    assert glue.read_tsv(path) == (["sentence", "label"], [['say "hi', "there"], ["it's \"quoted\"", "1"]])


def test_commonsense_json_not_utf8_or_broken(tmp_path):
    good = json.dumps([{"instruction": "q", "input": "", "output": "the correct answer is true", "answer": "true"}] * 3,
                      indent=1)
    bad_byte = not_utf8(tmp_path / "a" / "boolq" / "train.json", good, 4)
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(bad_byte))} is not UTF-8 text: byte 0xff .*\(line 4\)"
                                              r".*; re-save it as UTF-8 JSON, a list of \{instruction, input, output, "
                                              r"answer\} records .*or download the data again\.$"):
        commonsense.load_commonsense("boolq", "train", data_dir=tmp_path / "a")
    broken = tmp_path / "b" / "boolq" / "train.json"
    broken.parent.mkdir(parents=True)
    broken.write_text(good[:-10])
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(broken))} is not valid JSON \(.* at line \d+, "
                                              r"column \d+\); re-save it as UTF-8 JSON"):
        commonsense.load_commonsense("boolq", "train", data_dir=tmp_path / "b")


def test_math_jsonl_and_json_not_utf8_or_broken(tmp_path):
    rows = [json.dumps({"question": f"q{i}", "answer": f"2+2 <<2+2=4>>\n#### {i}"}) for i in range(4)]
    train = not_utf8(tmp_path / "a" / "gsm8k" / "train.jsonl", "\n".join(rows), 2)
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(train))} is not UTF-8 text: byte 0xff .*\(line 2\).*"
                                              r"; re-save it as UTF-8 JSON Lines, one \{question, answer\} object a "
                                              r"line \(GSM8K's format\), or download it again\.$"):
        mathdata.load_train(tmp_path / "a")
    broken = tmp_path / "b" / "gsm8k" / "train.jsonl"
    broken.parent.mkdir(parents=True)
    broken.write_text("\r\n".join(rows[:2] + [rows[2][:-5]] + rows[3:]))
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(broken))} is not valid JSON Lines \(\w[^()]* at "
                                              rf"line 3, "
                                              r"column \d+\); re-save it as UTF-8 JSON Lines"):
        mathdata.load_train(tmp_path / "b")
    broken.write_text("\r\n".join(rows) + "\r\n")  # CRLF and blank lines read as before
    assert [e.answer for e in mathdata.load_train(tmp_path / "b", seed=None)] == ["0", "1", "2", "3"]
    test = tmp_path / "c" / "math" / "gsm8k" / "test.json"
    test.parent.mkdir(parents=True)
    test.write_text('[{"instruction": "q", "answer": "1"},]')
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(test))} is not valid JSON \(.* at line 1, column "
                                              r"\d+\); re-save it as UTF-8 JSON, a list of"):
        mathdata.load_test("gsm8k", tmp_path / "c")
    not_utf8(test, '[{"instruction": "q", "answer": "1"}]', 1)
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(test))} is not UTF-8 text: byte 0xff at offset 0"):
        mathdata.load_test("gsm8k", tmp_path / "c")


# -- PEFT import -----------------------------------------------------------------------------------


def peft_folder(folder: Path, config: str = '{"peft_type": "LORA"}', cut: int = 0) -> Path:
    """A PEFT folder; ``cut``: bytes cut from the end of adapter_model.safetensors."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(config)
    weights = folder / "adapter_model.safetensors"
    save_file({"base_model.model.x.lora_A.weight": np.ones((4, 32), np.float32)}, str(weights))
    if cut:
        weights.write_bytes(weights.read_bytes()[:-cut])
    return folder


FIX = r"export the adapter again \(PEFT's save_pretrained\), or copy or download it again\.$"


def test_peft_import_names_a_truncated_weights_file_and_a_malformed_config(tmp_path, tiny_model_dir, capsys):
    truncated = peft_folder(tmp_path / "truncated", cut=100)
    weights = truncated / "adapter_model.safetensors"
    size = weights.stat().st_size
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(weights))} is truncated \({size} of {size + 100} "
                                              rf"bytes\); {FIX}"):
        peft.import_peft(truncated, {}, arch="bert")
    garbage = peft_folder(tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(garbage / 'adapter_model.safetensors'))} is not a "
                                              rf"readable safetensors file \(.*\): it is truncated, damaged or not "
                                              rf"safetensors; {FIX}"):
        peft.import_peft(garbage, {}, arch="bert")
    malformed = peft_folder(tmp_path / "malformed", config='{"peft_type": "LORA", "r": 8,}')
    config = malformed / "adapter_config.json"
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(config))} is not valid JSON \(Expecting property "
                                              rf"name enclosed in double quotes at line 1, column 30\); {FIX}"):
        peft.import_peft(malformed, {}, arch="bert")
    listed = peft_folder(tmp_path / "listed", config="[]")
    with pytest.raises(FileFormatError, match=rf"adapter_config.json holds a JSON list, not the object of settings "
                                              rf"PEFT writes; {FIX}"):
        peft.import_peft(listed, {}, arch="bert")
    for folder, text in ((truncated, f"adapter_model.safetensors is truncated ({size} of {size + 100} bytes)"),
                         (malformed, "adapter_config.json is not valid JSON")):
        code = cli.main(["import", str(folder), "--config", QUICK, "--out", str(tmp_path / "out"),
                         "--set", f"model.name={tiny_model_dir}"])
        assert code == 2
        one_line(capsys, f"{folder / text}")


# -- checkpoints: GGUF, safetensors, config.json ------------------------------------------------------


def tiny_gguf(path: Path) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_truncated_or_foreign_gguf_names_the_file(tmp_path, capsys):
    good = tiny_gguf(tmp_path / "tiny.gguf")
    assert [t.name for t in convert.gguf_reader(str(good)).tensors] == ["token_embd.weight", "output_norm.weight"]
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:-1000])
    message = rf"^{re.escape(str(truncated))} is truncated \({len(data) - 1000} of {len(data)} bytes\); download it again\.$"
    with pytest.raises(FileFormatError, match=message):
        convert.load_gguf(str(truncated))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:60])
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(header_only))} is not a readable GGUF file \(.*; 60 "
                                              r"bytes\): it is truncated, damaged or not GGUF; download it again\.$"):
        convert.load_gguf(str(header_only))
    assert cli.main(["convert", str(truncated), "--out", str(tmp_path / "out")]) == 2
    one_line(capsys, f"{truncated} is truncated ({len(data) - 1000} of {len(data)} bytes); download it again.")
    assert not (tmp_path / "out").exists()


def test_a_truncated_safetensors_or_bad_config_json_in_a_checkpoint_names_the_file(tmp_path, capsys):
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": np.arange(64, dtype=np.float32), "b": np.ones((2, 3), np.float32)}, str(path))
    data = path.read_bytes()
    assert set(convert.read_safetensors(str(path))) == {"a", "b"}
    path.write_bytes(data[:-8])
    fix = r"download the checkpoint again, or save it again with save_pretrained\.$"
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(path))} is truncated \({len(data) - 8} of {len(data)} "
                                              rf"bytes\); {fix}"):
        convert.read_safetensors(str(path))
    for garbage in (b"", b"\x01\x02", b"<html>404</html>" * 4, (20).to_bytes(8, "little") + b"{not json" + b" " * 11):
        path.write_bytes(garbage)
        with pytest.raises(FileFormatError, match=rf"^{re.escape(str(path))} is not a readable safetensors file \(.*\): "
                                                  rf"it is truncated, damaged or not safetensors; {fix}"):
            convert.read_safetensors(str(path))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 32\n"vocab_size": 10}')
    with pytest.raises(FileFormatError, match=rf"^{re.escape(str(folder / 'config.json'))} is not valid JSON "
                                              rf"\(Expecting ',' delimiter at line 2, column 1\); {fix}"):
        convert.load_hf(str(folder))
    assert cli.main(["convert", str(folder), "--out", str(tmp_path / "out")]) == 2
    one_line(capsys, f"{folder / 'config.json'} is not valid JSON")


# -- model.name ------------------------------------------------------------------------------------

CHOICES = r"model.name should be a local folder with config.json and weights, an installed model package"


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "~/no-such-model-4c2d", "models/no/such",
                                  "no-such.safetensors"])
def test_a_model_path_that_does_not_exist_fails_at_once(name):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"^model.name={re.escape(repr(name))}: .* does not exist; {CHOICES}"):
        hf.load_sequence_classifier(name, 2)
    assert time.perf_counter() - start < 1.0


def test_a_model_name_that_is_nothing_fails_fast_naming_it(tmp_path, capsys):
    name = "decomp-jax-tests/no-such-model-4c2d"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"^model.name={re.escape(repr(name))} is not a local folder, an "
                                                rf"installed model package, nor (in the local Hugging Face cache, and "
                                                rf"the hub cannot be reached|a model on the Hugging Face hub).*{CHOICES}"):
        hf.load_sequence_classifier(name, 2)
    seconds = time.perf_counter() - start
    print(f"model.name={name}: failed after {seconds:.2f} s")
    assert seconds < 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^model.name='{tmp_path / 'empty'}': the folder .* holds no "
                                                rf"config.json; {CHOICES}"):
        hf.load_sequence_classifier(str(tmp_path / "empty"), 2)
    with pytest.raises(FileNotFoundError, match=r"^model.name='/no/such.gguf' is neither a .gguf file"):
        convert.resolve_llm("/no/such.gguf")  # the decoder path
    data = sst2(tmp_path / "SST-2")
    code = cli.main(["train", QUICK, "--no-progress", "--set", f"data.path={data}", "--set", f"model.name={name}",
                     "--set", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2
    one_line(capsys, f"decomp-jax: error: model.name={name!r} is not a local folder")


def test_a_hub_id_in_the_local_cache_is_read_from_there(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--decomp-jax-tests--tiny-4c2d" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--decomp-jax-tests--tiny-4c2d" / "refs").mkdir()
    (tmp_path / "models--decomp-jax-tests--tiny-4c2d" / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.name='decomp-jax-tests/tiny-4c2d'"):  # no weights cached: not a model
        hf.resolve_model_path("decomp-jax-tests/tiny-4c2d")
    (snapshot / "model.safetensors").write_bytes(b"")
    assert hf.resolve_model_path("decomp-jax-tests/tiny-4c2d") == str(snapshot)
