"""Real-text domains: deterministic chunks within bounds, disjoint splits written as JSON Lines, absent sources skipped
with a notice, and man pages' roff turned into plain text. Every source is a small stand-in under tmp_path."""

import gzip
import json
import logging
from pathlib import Path

import pytest

from merging.data import corpora
from merging.data.corpora import REAL_TEXT_DOMAINS, build_real_text_pool, collect_chunks, roff_to_text
from merging.data.example import Example
from merging.errors import ConfigError

CHUNK_CHARS = 128
# Text that must never reach a chunk: it sits in files or folders each domain leaves out.
EXCLUDED_MARKERS = ("VENDORED", "TEST_SUITE", "IDLE_APP", "NOT_PYTHON", "BINARY_FILE", "HUGE_FILE", "GERMAN_PAGE")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_man_page(path: Path, roff: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(roff.encode()))


def python_module(number: int) -> str:
    return "".join(f"def function_{number}_{i}(value):\n    return value * {i} + {number}\n\n" for i in range(30))


def man_page(number: int) -> str:
    options = "".join(f".TP\n.B \\-{letter}{number}\nturn on the \\fI{letter}\\fR option of tool {number}.\n"
                      for letter in "abcdefghij")
    return f'.\\" comment\n.TH TOOL{number} 1\n.SH NAME\ntool{number} \\- does thing {number}\n.SH OPTIONS\n{options}'


@pytest.fixture()
def sources(tmp_path, monkeypatch) -> dict[str, Path]:
    """A few files per domain, plus files each domain must leave out; SOURCE_ROOTS points at them."""
    roots = {domain: tmp_path / "sources" / domain for domain in REAL_TEXT_DOMAINS}
    stdlib = roots["python_stdlib"]
    for number in range(12):
        write(stdlib / f"package{number % 3}" / f"module{number}.py", python_module(number))
    write(stdlib / "site-packages" / "vendored.py", "VENDORED = 1\n" * 100)
    write(stdlib / "unittest" / "test" / "test_case.py", "TEST_SUITE = 1\n" * 100)
    write(stdlib / "idlelib" / "editor.py", "IDLE_APP = 1\n" * 100)
    write(stdlib / "notes.txt", "NOT_PYTHON\n" * 100)

    headers = roots["c_headers"]
    for number in range(6):
        write(headers / "sys" / f"header{number}.h",
              "".join(f"#define CONSTANT_{number}_{i} {i}  /* the {i}th constant */\n" for i in range(40)))
    write(headers / "long_line.h", "int table[] = {" + ", ".join(map(str, range(400))) + "};\n")
    (headers / "blob.h").write_bytes(b"BINARY_FILE\0\1\2" * 50)
    write(headers / "huge.h", "HUGE_FILE\n" * 2000)
    monkeypatch.setattr(corpora, "MAX_FILE_BYTES", 10_000)

    man = roots["man_pages"]
    for number in range(5):
        write_man_page(man / f"man{number % 3 + 1}" / f"tool{number}.{number % 3 + 1}.gz", man_page(number))
    write_man_page(man / "de" / "man1" / "tool0.1.gz", ".SH NAME\nGERMAN_PAGE\n" * 50)

    licenses = roots["licenses"]
    for name in ("Apache-2.0", "BSD", "MIT"):
        write(licenses / name, "".join(f"{name} clause {i}: the software is provided as is.\n" for i in range(12)))
    (licenses / "Apache").symlink_to(licenses / "Apache-2.0")

    monkeypatch.setattr(corpora, "SOURCE_ROOTS", roots)
    return roots


def read_jsonl(path: Path) -> list[Example]:
    return [Example(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("domain", REAL_TEXT_DOMAINS)
def test_chunks_are_deterministic_and_a_smaller_request_is_a_prefix(sources, domain):
    chunks = collect_chunks(domain, max_chunks=1000, chunk_chars=CHUNK_CHARS, seed=7)
    assert chunks == collect_chunks(domain, max_chunks=1000, chunk_chars=CHUNK_CHARS, seed=7)
    assert collect_chunks(domain, max_chunks=5, chunk_chars=CHUNK_CHARS, seed=7) == chunks[:5]


def test_another_seed_visits_files_in_another_order(sources):
    first = collect_chunks("python_stdlib", max_chunks=1000, chunk_chars=CHUNK_CHARS, seed=7)
    second = collect_chunks("python_stdlib", max_chunks=1000, chunk_chars=CHUNK_CHARS, seed=8)
    assert first != second
    assert sorted(first) == sorted(second)  # every file is read to the end either way


@pytest.mark.parametrize("domain", REAL_TEXT_DOMAINS)
def test_chunks_are_distinct_within_length_bounds_and_leave_out_excluded_files(sources, domain):
    chunks = collect_chunks(domain, max_chunks=1000, chunk_chars=CHUNK_CHARS, seed=0)
    assert chunks
    assert len(set(chunks)) == len(chunks)
    for chunk in chunks:
        assert CHUNK_CHARS / 4 <= len(chunk) <= CHUNK_CHARS, chunk
        assert chunk == chunk.strip("\n")
        assert not any(marker in chunk for marker in EXCLUDED_MARKERS), chunk


def test_chunks_end_at_line_ends_and_long_lines_are_cut(sources):
    source_lines = {line for path in sources["c_headers"].glob("sys/*.h") for line in path.read_text().splitlines()}
    chunks = collect_chunks("c_headers", max_chunks=1000, chunk_chars=CHUNK_CHARS, seed=0)
    table_pieces = [chunk for chunk in chunks if "," in chunk and "#define" not in chunk]
    assert len(table_pieces) >= 10
    assert all("\n" not in piece for piece in table_pieces)
    for chunk in chunks:
        if "#define" in chunk:
            assert set(chunk.split("\n")) <= source_lines


def test_man_pages_are_plain_text(sources):
    text = "\n".join(collect_chunks("man_pages", max_chunks=1000, chunk_chars=CHUNK_CHARS, seed=0))
    assert "tool3 - does thing 3" in text
    assert "turn on the c option of tool 4." in text
    assert "\\f" not in text and ".TH" not in text and "comment" not in text


def test_pool_splits_are_disjoint_jsonl_of_the_requested_sizes(sources, tmp_path):
    sizes = {"train": 20, "calib": 2, "eval": 5}
    results = build_real_text_pool(tmp_path / "pool", sizes, CHUNK_CHARS, seed=3,
                                   domains=("python_stdlib", "c_headers"))
    assert results == {"python_stdlib": "written 27 examples", "c_headers": "written 27 examples"}
    for domain in ("python_stdlib", "c_headers"):
        splits = {name: read_jsonl(tmp_path / "pool" / domain / f"{name}.jsonl") for name in sizes}
        assert {name: len(examples) for name, examples in splits.items()} == sizes
        assert all(example.prompt == "" and example.answer is None for split in splits.values() for example in split)
        responses = [example.response for split in splits.values() for example in split]
        assert len(set(responses)) == len(responses)
        assert set(responses) <= set(collect_chunks(domain, max_chunks=27, chunk_chars=CHUNK_CHARS, seed=3))


def test_evaluation_text_does_not_change_with_the_training_size(sources, tmp_path):
    build_real_text_pool(tmp_path / "small", {"train": 5, "eval": 3}, CHUNK_CHARS, seed=3, domains=("c_headers",))
    build_real_text_pool(tmp_path / "large", {"train": 30, "eval": 3}, CHUNK_CHARS, seed=3, domains=("c_headers",))
    assert (read_jsonl(tmp_path / "small" / "c_headers" / "eval.jsonl")
            == read_jsonl(tmp_path / "large" / "c_headers" / "eval.jsonl"))


def test_a_short_source_has_every_split_scaled_down_with_a_warning(sources, tmp_path, caplog):
    available = len(collect_chunks("licenses", max_chunks=1000, chunk_chars=CHUNK_CHARS, seed=1))
    sizes = {"train": 200, "calib": 1, "eval": 20}
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        results = build_real_text_pool(tmp_path / "pool", sizes, CHUNK_CHARS, seed=1, domains=("licenses",))
    assert results == {"licenses": f"written {available} examples"}
    counts = {name: len(read_jsonl(tmp_path / "pool" / "licenses" / f"{name}.jsonl")) for name in sizes}
    assert sum(counts.values()) == available
    assert min(counts.values()) >= 1 and counts["train"] > counts["eval"] >= counts["calib"]
    assert any("licenses" in message and f"{available} of the 221" in message for message in caplog.messages)


def test_an_absent_source_is_skipped_with_a_notice(sources, tmp_path, monkeypatch, caplog):
    missing = tmp_path / "no-such-folder"
    monkeypatch.setitem(corpora.SOURCE_ROOTS, "man_pages", missing)
    assert collect_chunks("man_pages", max_chunks=10, chunk_chars=CHUNK_CHARS, seed=0) == []
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        results = build_real_text_pool(tmp_path / "pool", {"train": 4, "eval": 2}, CHUNK_CHARS, seed=0,
                                       domains=("man_pages", "licenses"))
    assert results == {"man_pages": f"skipped: no source at {missing}", "licenses": "written 6 examples"}
    assert not (tmp_path / "pool" / "man_pages").exists()
    assert any("man_pages" in message and "skipped" in message for message in caplog.messages)


def test_unknown_domain_is_refused_before_anything_is_written(sources, tmp_path):
    with pytest.raises(ConfigError, match="unknown real-text domain 'poetry'; choose one of python_stdlib"):
        collect_chunks("poetry", max_chunks=10, chunk_chars=CHUNK_CHARS, seed=0)
    with pytest.raises(ConfigError, match="unknown real-text domain 'poetry'"):
        build_real_text_pool(tmp_path / "pool", {"train": 4}, CHUNK_CHARS, seed=0, domains=("licenses", "poetry"))
    assert not (tmp_path / "pool").exists()


def test_roff_becomes_plain_text():
    roff = "\n".join([
        '.\\" Copyright 1993 someone',
        '.TH MOTD 5 2022-10-30 "Linux man-pages 6.03"',
        ".SH NAME",
        "motd \\- message of the day",
        ".SH DESCRIPTION",
        "The contents of",
        ".I /etc/motd",
        "are shown by\\",
        ".BR login (1)",
        "after \\fBlogin\\fR, see \\fIpam_motd\\fP(8)\\(em or \\*(lqnot\\*(rq.  \\\" trailing comment",
        ".PP",
        ".IP \\(bu 2",
        "caf\\[u00E9] in C:\\e\\&path",
        '.SH "SEE ALSO"',
        '.B "-o file"',
    ])
    assert roff_to_text(roff) == "\n".join([
        "NAME",
        "motd - message of the day",
        "",
        "DESCRIPTION",
        "The contents of",
        "/etc/motd",
        "are shown by",
        "login(1)",
        "after login, see pam_motd(8)\u2014 or \"not\".",
        "",
        "\u2022",
        "caf\u00e9 in C:\\path",
        "",
        "SEE ALSO",
        "-o file",
    ])
