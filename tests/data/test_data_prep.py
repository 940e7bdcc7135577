"""data_prep tokenize: inputs, layout, split, bad records, strictness, overwrite and resume."""
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import make_documents, prepare, write_jsonl

from data_prep.__main__ import main as data_prep_main
from data_prep.part_writer import PARTS_DIR, is_val
from ratpt.data.layout import token_dtype
from ratpt.data.shards import ShardedDocuments
from ratpt.data.tokenizer import load_tokenizer


def read_split(out: Path, split: str) -> list[str]:
    """Every document of a split, decoded, in MDS order (EOS stripped)."""
    docs = ShardedDocuments(str(out), split)
    tok = load_tokenizer(out / "tokenizer")
    texts = []
    for i in range(len(docs)):
        ids = docs.tokens(i).tolist()
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        texts.append(tok.decode(ids[:-1]))
    return texts


def test_output_layout_meta_and_stats(corpus):
    docs, out = corpus
    for sub in ("train/index.json", "val/index.json", "train/doc_tokens.npy", "tokenizer/meta.json", "stats.json"):
        assert (out / sub).is_file(), sub
    meta = json.loads((out / "tokenizer/meta.json").read_text())
    assert meta == {"name": "byte", "kind": "byte", "vocab_size": 257, "eos_id": 256, "sha256": None,
                    "file": None, "dtype": "uint16"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"]["train"] + stats["documents"]["val"] == len(docs)
    assert stats["tokens"]["train"] + stats["tokens"]["val"] == sum(len(d.encode()) + 1 for d in docs)
    assert stats["bytes"] == sum(len(d.encode()) for d in docs)
    assert stats["bad_records"]["total"] == 0 and stats["seconds"] > 0


def test_split_is_by_document_hash_and_keeps_input_order(corpus):
    docs, out = corpus
    assert read_split(out, "train") == [d for d in docs if not is_val(d, 0.2)]
    assert read_split(out, "val") == [d for d in docs if is_val(d, 0.2)]
    counts = np.load(out / "train/doc_tokens.npy")
    assert counts.tolist() == [len(d.encode()) + 1 for d in docs if not is_val(d, 0.2)]


def test_token_dtype_follows_vocab_size():
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_all_input_kinds_and_a_selectable_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = make_documents(12, seed=3)
    src = tmp_path / "in"
    (src / "nested").mkdir(parents=True)
    lines = "".join(json.dumps({"body": d}) + "\n" for d in docs[0:2]).encode()
    (src / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    lines = "".join(json.dumps({"body": d}) + "\n" for d in docs[2:4]).encode()
    (src / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"body": docs[4:7]}), src / "c.parquet")
    (src / "nested" / "d.txt").write_text(docs[7])
    write_jsonl(tmp_path / "e.jsonl", docs[8:12], field="body")
    out = prepare([str(src), str(tmp_path / "e.*"), "pydoc"], tmp_path / "out", "--text-field", "body",
                  "--val-fraction", "0")
    texts = read_split(out, "train")
    from pydoc_data.topics import topics

    assert texts == docs + [topics[k] for k in sorted(topics)]


BAD_CASES = {
    "invalid_json": (b'{"text": "ok one"}\n{"text": broken\n', 2),
    "missing_field": (b'{"text": "ok one"}\n{"body": "wrong key"}\n', 2),
    "not_utf8": (b'{"text": "ok one"}\n{"text": "caf\xe9"}\n', 2),
    "empty_document": (b'{"text": "ok one"}\n{"text": "  \\n "}\n', 2),
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_record_is_counted_with_file_and_line_and_skipped(tmp_path, kind):
    content, line = BAD_CASES[kind]
    (tmp_path / "x.jsonl").write_bytes(content + b'{"text": "ok two"}\n')
    out = prepare([str(tmp_path / "x.jsonl")], tmp_path / "out", "--val-fraction", "0")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["bad_records"]["by_kind"] == {kind: 1}
    assert stats["bad_records"]["records"][0]["location"] == f"{tmp_path / 'x.jsonl'}:{line}"
    assert read_split(out, "train") == ["ok one", "ok two"]


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_strict_stops_at_the_first_bad_record(tmp_path, kind, caplog):
    content, line = BAD_CASES[kind]
    (tmp_path / "x.jsonl").write_bytes(content)
    assert data_prep_main(["tokenize", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "out"), "--strict"]) == 1
    assert f"x.jsonl:{line}: {kind}" in caplog.text


def test_unreadable_file_is_reported_and_the_run_goes_on(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip")
    write_jsonl(tmp_path / "good.jsonl", ["fine text"])
    out = prepare([str(tmp_path / "bad.jsonl.gz"), str(tmp_path / "good.jsonl")], tmp_path / "out", "--val-fraction", "0")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["bad_records"]["by_kind"] == {"unreadable_file": 1}
    assert stats["bad_records"]["records"][0]["location"] == str(tmp_path / "bad.jsonl.gz")
    assert read_split(out, "train") == ["fine text"]


def test_existing_output_is_never_silently_overwritten(corpus, tmp_path, caplog):
    docs, out = corpus
    before = (out / "train/index.json").read_bytes()
    assert data_prep_main(["tokenize", "pydoc", "--out", str(out)]) == 1
    assert "already exists" in caplog.text and (out / "train/index.json").read_bytes() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    assert data_prep_main(["tokenize", "pydoc", "--out", str(tmp_path / "mine"), "--overwrite"]) == 1
    assert (tmp_path / "mine" / "precious.txt").is_file()


def test_overwrite_restarts_and_resume_checks_settings(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    out = prepare([str(tmp_path / "a.jsonl")], tmp_path / "out")
    prepare([str(tmp_path / "a.jsonl")], out, "--overwrite", "--val-fraction", "0.5")
    assert data_prep_main(["tokenize", str(tmp_path / "a.jsonl"), "--out", str(out), "--resume"]) == 1
    assert "different settings" in caplog.text


def test_interrupted_run_resumes_to_the_same_output(tmp_path):
    inputs = []
    for i in range(3):
        inputs.append(str(write_jsonl(tmp_path / f"{i}.jsonl", make_documents(40, seed=10 + i))))
    reference = prepare(inputs, tmp_path / "ref", "--val-fraction", "0.3")
    # An interruption: part 1 half-written (no completion marker), nothing merged yet.
    out = prepare(inputs, tmp_path / "out", "--val-fraction", "0.3")
    (out / PARTS_DIR / "part-00001.json").unlink()
    for path in [out / "stats.json", out / "train/index.json", *(out / "train/part-00001").glob("*.mds")]:
        path.unlink()
    prepare(inputs, out, "--val-fraction", "0.3", "--resume")
    for split in ("train", "val"):
        assert read_split(out, split) == read_split(reference, split)
        assert (out / split / "index.json").read_text() == (reference / split / "index.json").read_text()


def test_worker_count_does_not_change_the_output(tmp_path):
    inputs = [str(write_jsonl(tmp_path / f"{i}.jsonl", make_documents(30, seed=20 + i))) for i in range(3)]
    one = prepare(inputs, tmp_path / "one", "--workers", "1")
    two = prepare(inputs, tmp_path / "two", "--workers", "2", "--compression", "zstd", "--shard-size-limit", "4kb")
    assert read_split(one, "train") == read_split(two, "train")
    index = json.loads((two / "train/index.json").read_text())
    assert len(index["shards"]) > 3 and all(s["zip_data"] for s in index["shards"])


def test_train_tokenizer_cli_output_tokenizes(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_documents(50, seed=5))
    assert data_prep_main(["train-tokenizer", str(tmp_path / "a.jsonl"), "--vocab-size", "300",
                           "--out", str(tmp_path / "tok")]) == 0
    out = prepare([str(tmp_path / "a.jsonl")], tmp_path / "out", "--tokenizer", str(tmp_path / "tok/tokenizer.json"),
                  "--val-fraction", "0")
    meta = json.loads((out / "tokenizer/meta.json").read_text())
    assert meta["kind"] == "hf" and meta["vocab_size"] == 300 and meta["eos_id"] == 0
    assert (out / "tokenizer/tokenizer.json").is_file()
    assert read_split(out, "train") == make_documents(50, seed=5)


@pytest.mark.parametrize("command", [["tokenize"], ["train-tokenizer", "--vocab-size", "300"]], ids=lambda c: c[0])
def test_inputs_without_a_document_are_an_error_naming_the_text_field(tmp_path, caplog, command):
    write_jsonl(tmp_path / "a.jsonl", make_documents(5, seed=6), field="body")
    assert data_prep_main([*command, str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out")]) == 1
    assert "no documents" in caplog.text and "--text-field 'text'" in caplog.text


def test_train_tokenizer_rejects_a_vocabulary_smaller_than_the_bytes(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", make_documents(5, seed=6))
    assert data_prep_main(["train-tokenizer", str(tmp_path / "a.jsonl"), "--vocab-size", "10",
                           "--out", str(tmp_path / "tok")]) == 1
    assert "--vocab-size must be at least 257" in caplog.text and not (tmp_path / "tok").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--shard-size-limit", "lots", "Unsupported value/suffix lots"),
    ("--shard-size-limit", "0", "'0' is no size: give a positive size"),
    ("--workers", "0", "must be >= 1, got 0"),
], ids=["shard-size-not-a-size", "shard-size-zero", "no-workers"])
def test_a_bad_option_is_rejected_before_any_output(tmp_path, capsys, flag, value, message):
    write_jsonl(tmp_path / "a.jsonl", make_documents(5, seed=6))
    with pytest.raises(SystemExit):
        data_prep_main(["tokenize", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err and not (tmp_path / "out").exists()


def test_train_tokenizer_never_overwrites_a_tokenizer_or_writes_into_a_file(tmp_path, caplog):
    """An existing tokenizer.json may be the one shards were written with: replacing it would make them decode
    to garbage. A --out that is some other file is no folder to write tokenizer.json in."""
    write_jsonl(tmp_path / "a.jsonl", make_documents(50, seed=5))
    train = ["train-tokenizer", str(tmp_path / "a.jsonl"), "--vocab-size", "300", "--out"]
    assert data_prep_main([*train, str(tmp_path / "tok.json")]) == 0
    first = (tmp_path / "tok.json").read_bytes()
    assert data_prep_main([*train, str(tmp_path / "tok.json")]) == 1
    assert "tok.json exists, and shards may have been tokenized with it" in caplog.text
    assert (tmp_path / "tok.json").read_bytes() == first and not list(tmp_path.glob("*.partial"))
    assert data_prep_main([*train, str(tmp_path / "a.jsonl")]) == 1
    assert "a.jsonl is a file: give a .json path, or a folder for tokenizer.json" in caplog.text


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        data_prep_main(["tokenize", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--tokenizer", "--text-field", "--workers", "--val-fraction", "--shard-size-limit",
                   "--compression", "--strict", "--resume", "--overwrite", "pydoc"):
        assert option in text


def error_lines(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_a_corrupt_parquet_file_is_named_instead_of_blaming_the_text_field(tmp_path, caplog):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not a parquet file")
    assert data_prep_main(["tokenize", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "out")]) == 1
    errors = error_lines(caplog)
    assert f"{tmp_path / 'x.parquet'} cannot be read" in errors and "--text-field" not in errors


@pytest.mark.parametrize("out, message", [
    ("out", "{out} is a file"),
    ("out/sub", "cannot write {out} for data_prep tokenize (Not a directory: {out}): choose a folder"),
])
def test_out_naming_an_existing_file_or_a_folder_inside_one_is_a_clear_error(tmp_path, caplog, out, message):
    write_jsonl(tmp_path / "a.jsonl", ["some text"])
    (tmp_path / "out").write_text("precious")
    assert data_prep_main(["tokenize", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / out)]) == 1
    errors = error_lines(caplog)
    assert message.format(out=tmp_path / out) in errors and "--resume" not in errors
    assert (tmp_path / "out").read_text() == "precious"


def test_a_write_error_is_one_line_naming_the_output_folder(tmp_path):
    """A file size limit (`ulimit -f`, as a full disk would) makes the shard writes fail."""
    import resource
    import subprocess
    import sys

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    done = subprocess.run([sys.executable, "-m", "data_prep", "tokenize", "pydoc", "--out", str(tmp_path / "out")],
                          cwd=Path(__file__).resolve().parents[2], preexec_fn=limit_file_size,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"cannot write {tmp_path / 'out'}" in done.stderr and "File too large" in done.stderr
    assert "--resume" in done.stderr


def test_a_suffix_matches_in_any_case_and_a_file_of_another_type_is_refused(tmp_path, caplog):
    """A .JSONL file was read as one plain-text document of raw JSON; a .csv named outright likewise."""
    write_jsonl(tmp_path / "UPPER.JSONL", ["one", "two"])
    out = prepare([str(tmp_path / "UPPER.JSONL")], tmp_path / "out", "--val-fraction", "0")
    assert read_split(out, "train") == ["one", "two"]
    (tmp_path / "table.csv").write_text("text\none\n")
    assert data_prep_main(["tokenize", str(tmp_path / "table.csv"), "--out", str(tmp_path / "csv")]) == 1
    assert f"input '{tmp_path / 'table.csv'}' is not a supported file type" in error_lines(caplog)
    assert not (tmp_path / "csv").exists()


def test_a_folder_names_the_files_of_other_types_it_leaves_out(tmp_path, caplog):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", ["kept"])
    (tmp_path / "in" / "b.jsonl.bz2").write_bytes(b"BZh9")
    out = prepare([str(tmp_path / "in")], tmp_path / "out", "--val-fraction", "0")
    assert read_split(out, "train") == ["kept"]
    assert f"1 file(s) of unsupported types left out, e.g. {tmp_path / 'in' / 'b.jsonl.bz2'}" in caplog.text


def test_a_file_given_under_several_spellings_is_read_once(tmp_path):
    """`a.jsonl`, `./a.jsonl`, its folder and a glob over it: every document was tokenized once per spelling."""
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", ["only once"])
    spellings = [str(tmp_path / "in" / "a.jsonl"), f"{tmp_path}/in/./a.jsonl", str(tmp_path / "in"),
                 f"{tmp_path}/in/../in/*.jsonl"]
    out = prepare(spellings, tmp_path / "out", "--val-fraction", "0")
    assert read_split(out, "train") == ["only once"]


def test_a_byte_order_mark_is_not_part_of_a_record(tmp_path):
    """A file saved with a UTF-8 byte order mark lost its first JSON line as invalid_json."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "first"}\n' + bom + b'{"text": "second"}\n')
    (tmp_path / "b.txt").write_bytes(bom + "third".encode())
    out = prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], tmp_path / "out", "--val-fraction", "0")
    assert read_split(out, "train") == ["first", "second", "third"]
    assert json.loads((out / "stats.json").read_text())["bad_records"]["total"] == 0


def zstd_jsonl(docs: list[str], frames: int = 1) -> bytes:
    import zstandard

    lines = [(json.dumps({"text": d}) + "\n").encode() for d in docs]
    per_frame = -(-len(lines) // frames)
    return b"".join(zstandard.ZstdCompressor().compress(b"".join(lines[i:i + per_frame]))
                    for i in range(0, len(lines), per_frame))


def test_a_zst_file_of_several_frames_is_read_whole(tmp_path):
    docs = make_documents(6, seed=11)
    (tmp_path / "a.jsonl.zst").write_bytes(zstd_jsonl(docs, frames=3))
    out = prepare([str(tmp_path / "a.jsonl.zst")], tmp_path / "out", "--val-fraction", "0")
    assert read_split(out, "train") == docs


@pytest.mark.parametrize("damage, detail", [
    ("truncated", "EOFError: the file ends inside a zstd frame: it is truncated"),
    ("not_zstd", "ValueError: corrupt zstd data"),
])
def test_a_truncated_or_corrupt_zst_file_is_an_unreadable_file(tmp_path, damage, detail):
    """A truncated .zst file lost its documents without a bad record; one that is not zstd was a traceback."""
    data = zstd_jsonl(make_documents(40, seed=12))
    (tmp_path / "bad.jsonl.zst").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not zstd" * 8)
    write_jsonl(tmp_path / "good.jsonl", ["fine text"])
    out = prepare([str(tmp_path / "bad.jsonl.zst"), str(tmp_path / "good.jsonl")], tmp_path / "out",
                  "--val-fraction", "0")
    bad = json.loads((out / "stats.json").read_text())["bad_records"]["records"]
    assert [(b["location"], b["kind"]) for b in bad] == [(str(tmp_path / "bad.jsonl.zst"), "unreadable_file")]
    assert bad[0]["detail"].startswith(detail)
    assert read_split(out, "train") == ["fine text"]


NO_DOCUMENT_CASES = {  # content of x.jsonl -> what the error says instead of blaming --text-field
    "empty": (b"", "the inputs hold no records: they are empty"),
    "utf16": ('{"text": "wide"}\n'.encode("utf-16"), "not_utf8, first {x}:1"),
    "json_array": (b'[{"text": "a"}, {"text": "b"}]\n', "invalid_json, first {x}:1 (a JSON list, not an object)"),
    "not_a_string": (b'{"text": ["a", "b"]}\n{"text": null}\n',
                     "2 record(s) not_a_string, first {x}:1 ('text' is list, not a string)"),
}


@pytest.mark.parametrize("case", sorted(NO_DOCUMENT_CASES))
@pytest.mark.parametrize("command", [["tokenize"], ["train-tokenizer", "--vocab-size", "300"]], ids=lambda c: c[0])
def test_inputs_without_a_document_name_what_was_wrong(tmp_path, caplog, command, case):
    """These said 'all N records were bad', or asked whether --text-field was the right field."""
    content, message = NO_DOCUMENT_CASES[case]
    (tmp_path / "x.jsonl").write_bytes(content)
    assert data_prep_main([*command, str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "out.json")]) == 1
    errors = error_lines(caplog)
    assert "no documents" in errors and message.format(x=tmp_path / "x.jsonl") in errors
    assert "is --text-field" not in errors


def test_out_inside_an_input_folder_is_refused(tmp_path, caplog):
    """The next run over the folder read the output's own .json files as inputs (a --resume was refused
    for 'different sources', an --overwrite tokenized index.json and stats.json)."""
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", ["text"])
    assert data_prep_main(["tokenize", str(tmp_path / "in"), "--out", str(tmp_path / "in" / "out")]) == 1
    assert f"--out {tmp_path / 'in' / 'out'} is inside the input folder {tmp_path / 'in'}" in error_lines(caplog)
    assert not (tmp_path / "in" / "out").exists()


def test_a_lone_surrogate_is_a_bad_record_not_the_end_of_the_run(tmp_path):
    """A JSON escape such as \\ud800 decodes to a string that UTF-8 cannot encode: it stopped tokenize and
    train-tokenizer with a UnicodeEncodeError naming neither the file nor the line."""
    (tmp_path / "x.jsonl").write_text('{"text": "ok one"}\n{"text": "half \\ud800 a pair"}\n{"text": "ok two"}\n')
    out = prepare([str(tmp_path / "x.jsonl")], tmp_path / "out", "--val-fraction", "0")
    bad = json.loads((out / "stats.json").read_text())["bad_records"]["records"]
    assert [(b["location"], b["kind"]) for b in bad] == [(f"{tmp_path / 'x.jsonl'}:2", "not_utf8")]
    assert "lone surrogate" in bad[0]["detail"]
    assert read_split(out, "train") == ["ok one", "ok two"]
    assert data_prep_main(["train-tokenizer", str(tmp_path / "x.jsonl"), "--vocab-size", "300",
                           "--out", str(tmp_path / "tok.json")]) == 0


def test_train_tokenizer_rejects_a_vocabulary_too_large_to_allocate(tmp_path, caplog):
    """10^11 made the BPE trainer allocate 4.5 TB and abort the process (exit 134, no message)."""
    write_jsonl(tmp_path / "a.jsonl", make_documents(5, seed=6))
    assert data_prep_main(["train-tokenizer", str(tmp_path / "a.jsonl"), "--vocab-size", "99999999999",
                           "--out", str(tmp_path / "tok.json")]) == 1
    assert "--vocab-size must be at least 257 (the 256 bytes and EOS) and at most 16777216, got 99999999999" in \
        error_lines(caplog)


def test_resume_redoes_a_finished_part_whose_files_are_gone(tmp_path, caplog):
    """A part with its completion marker but without its folder made --resume fail in streaming's merge_index
    with a RuntimeError traceback."""
    inputs = [str(write_jsonl(tmp_path / f"{i}.jsonl", make_documents(20, seed=30 + i))) for i in range(2)]
    out = prepare(inputs, tmp_path / "out", "--val-fraction", "0.3")
    expected = {split: read_split(out, split) for split in ("train", "val")}
    shutil.rmtree(out / "train" / "part-00000")
    prepare(inputs, out, "--val-fraction", "0.3", "--resume")
    assert f"{out}: train/part-00000/index.json is missing, so this part is tokenized again" in caplog.text
    assert {split: read_split(out, split) for split in ("train", "val")} == expected
