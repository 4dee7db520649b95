"""Real-text domains cut from text already on the machine: Python source, C headers, man pages and licenses.

Nothing is downloaded. A domain whose source is absent is skipped with a notice, so the pool builds on any machine;
the text therefore depends on what is installed, and the choice among it only on the seed.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

from merging.data.example import Example, write_jsonl
from merging.data.splits import assign_splits, scaled_sizes
from merging.errors import ConfigError
from merging.seeding import python_rng

log = logging.getLogger("mergeplan")

REAL_TEXT_DOMAINS: tuple[str, ...] = ("python_stdlib", "c_headers", "man_pages", "licenses")

# One place for every root, so that tests (and unusual machines) can point a domain elsewhere.
SOURCE_ROOTS: dict[str, Path] = {
    "python_stdlib": Path(sysconfig.get_paths()["stdlib"]),
    "c_headers": Path("/usr/include"),
    "man_pages": Path("/usr/share/man"),
    "licenses": Path("/usr/share/common-licenses"),
}

# Bigger files are generated tables or dumps: they would fill a domain with one file's repetitive text.
MAX_FILE_BYTES = 2 * 1024 * 1024

# Installed third-party packages and test suites are not the standard library's own prose and code; idlelib and
# turtledemo are applications shipped beside it.
_STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                                  "idlelib", "turtledemo"})

_EXCESS_BLANK_LINES = re.compile(r"\n{4,}")


def collect_chunks(domain: str, max_chunks: int, chunk_chars: int, seed: int) -> list[str]:
    """Up to `max_chunks` distinct pieces of `domain`'s text, each of chunk_chars/4 to chunk_chars characters.

    Files are visited in an order shuffled by (seed, domain) and cut on line boundaries, so the result is the same
    for the same arguments and installed files, and a smaller request gives a prefix of a larger one. Returns []
    when the source is absent.
    """
    root = _source_root(domain)
    if max_chunks < 0 or chunk_chars < 1:
        raise ConfigError(f"real-text domain '{domain}': max_chunks must be >= 0 and chunk_chars >= 1, "
                          f"got {max_chunks} and {chunk_chars}")
    files = _candidate_files(domain, root)
    python_rng(seed, domain).shuffle(files)
    long_enough = (chunk for chunk in _file_chunks(domain, files, chunk_chars) if len(chunk) >= chunk_chars / 4)
    return list(islice(_distinct(long_enough), max_chunks))


def build_real_text_pool(out_dir: Path, sizes: dict[str, int], chunk_chars: int, seed: int,
                         domains: tuple[str, ...] = REAL_TEXT_DOMAINS) -> dict[str, str]:
    """Write out_dir/DOMAIN/SPLIT.jsonl for each domain, with disjoint splits of the requested sizes.

    Smaller splits take the first chunks, so evaluation and calibration text stays the same when only the training
    size changes. A source with too few chunks has every split scaled down (with a warning); one with none is
    skipped. Returns {domain: "written N examples" | "skipped: <reason>"}.
    """
    for domain in domains:
        _source_root(domain)  # every name is checked before anything is written
    for name, size in sizes.items():
        if size < 1:
            raise ConfigError(f"split '{name}' of the real-text pool has size {size}; sizes must be >= 1")
    return {domain: _write_domain(out_dir / domain, domain, sizes, chunk_chars, seed) for domain in domains}


def roff_to_text(source: str) -> str:
    """Plain text of a man page's roff source: comments and layout requests dropped, headings and font requests
    kept as their words, escapes resolved, and at most one blank line between paragraphs."""
    lines: list[str] = []
    for source_line in source.splitlines():
        for line in _roff_output_lines(source_line):
            if line or (lines and lines[-1]):
                lines.append(line)
    return "\n".join(lines).strip("\n")


def _source_root(domain: str) -> Path:
    if domain not in REAL_TEXT_DOMAINS:
        raise ConfigError(f"unknown real-text domain '{domain}'; choose one of {', '.join(REAL_TEXT_DOMAINS)}")
    return SOURCE_ROOTS[domain]


def _candidate_files(domain: str, root: Path) -> list[Path]:
    """The domain's files under `root`, sorted by path; [] when `root` is absent."""
    if domain == "python_stdlib":
        return _files_under(root, lambda name: name.endswith(".py"), _STDLIB_SKIPPED_DIRS)
    if domain == "c_headers":
        return _files_under(root, lambda name: name.endswith(".h"))
    if domain == "man_pages":
        # English pages only: translations live in sibling folders named by locale (de/man1, ja/man1, ...).
        sections = sorted(root.glob("man[1-9]*"))
        return [path for section in sections for path in _files_under(section, lambda name: name.endswith(".gz"))]
    return _files_under(root, lambda name: True)


def _files_under(root: Path, wanted: Callable[[str], bool], skipped_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Wanted files under `root`, sorted; [] when `root` is absent. Aliases (GPL -> GPL-3) add nothing: their chunks
    repeat ones already taken."""
    paths: list[Path] = []
    for folder, dir_names, file_names in os.walk(root):
        dir_names[:] = [name for name in dir_names if name not in skipped_dirs]
        paths.extend(Path(folder, name) for name in file_names if wanted(name))
    return sorted(paths)


def _file_chunks(domain: str, files: Iterable[Path], chunk_chars: int) -> Iterator[str]:
    for path in files:
        text = _file_text(domain, path)
        if text is not None:
            yield from _chunks(_normalise(text), chunk_chars)


def _file_text(domain: str, path: Path) -> str | None:
    """The file's text, or None when it cannot be read, is too big or looks binary."""
    opener = gzip.open if domain == "man_pages" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError, zlib.error) as error:
        log.debug("skipping %s: %s", path, error)
        return None
    if len(data) > MAX_FILE_BYTES or b"\0" in data:
        return None
    text = data.decode("utf-8", errors="replace")
    return roff_to_text(text) if domain == "man_pages" else text


def _normalise(text: str) -> str:
    """Unix line ends, no trailing spaces, at most two blank lines in a row; indentation is kept, code needs it."""
    lines = (line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return _EXCESS_BLANK_LINES.sub("\n\n\n", "\n".join(lines)).strip("\n")


def _chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """Pieces of at most `chunk_chars` characters ending at line ends, without blank lines at their edges."""
    lines: list[str] = []
    size = 0  # length of "\n".join(lines) plus one, so that adding a line costs len(line) more
    for line in _short_lines(text.split("\n"), chunk_chars):
        if lines and size + len(line) > chunk_chars:
            yield "\n".join(lines).strip("\n")
            lines, size = [], 0
        lines.append(line)
        size += len(line) + 1
    if lines:
        yield "\n".join(lines).strip("\n")


def _short_lines(lines: Iterable[str], limit: int) -> Iterator[str]:
    """The lines, each one longer than `limit` cut into pieces of `limit` characters."""
    for line in lines:
        if len(line) <= limit:
            yield line
        else:
            yield from (line[start:start + limit] for start in range(0, len(line), limit))


def _distinct(chunks: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for chunk in chunks:
        if chunk not in seen:
            seen.add(chunk)
            yield chunk


def real_text_splits(domain: str, sizes: dict[str, int], chunk_chars: int, seed: int) -> dict[str, list[Example]]:
    """The domain's chunks as disjoint splits (scaled down, with a warning, when short); {} when skipped."""
    return _splits_or_reason(domain, sizes, chunk_chars, seed)[0]


def _splits_or_reason(domain: str, sizes: dict[str, int], chunk_chars: int,
                      seed: int) -> tuple[dict[str, list[Example]], str | None]:
    requested = sum(sizes.values())
    chunks = collect_chunks(domain, requested, chunk_chars, seed)
    if len(chunks) < len(sizes):
        reason = _shortage_reason(domain, len(chunks), len(sizes))
        log.warning("real-text domain '%s' skipped: %s", domain, reason)
        return {}, reason
    counts = sizes
    if len(chunks) < requested:
        counts = scaled_sizes(sizes, len(chunks))
        log.warning("real-text domain '%s' has %d of the %d chunks requested; splits scaled down to %s",
                    domain, len(chunks), requested, ", ".join(f"{count} {name}" for name, count in counts.items()))
    examples = [Example(prompt="", response=chunk, answer=None) for chunk in chunks]
    return assign_splits(examples, counts), None


def _write_domain(folder: Path, domain: str, sizes: dict[str, int], chunk_chars: int, seed: int) -> str:
    splits, reason = _splits_or_reason(domain, sizes, chunk_chars, seed)
    if reason is not None:
        return f"skipped: {reason}"
    for name, examples in splits.items():
        write_jsonl(folder / f"{name}.jsonl", examples)
    return f"written {sum(len(e) for e in splits.values())} examples"


def _shortage_reason(domain: str, found: int, splits: int) -> str:
    root = SOURCE_ROOTS[domain]
    if not root.is_dir():
        return f"no source at {root}"
    if found == 0:
        return f"no usable text under {root}"
    return f"only {found} chunks under {root}, fewer than the {splits} splits"


# Named glyphs and the predefined strings of the man macros; any other has no plain-text form worth keeping.
_ROFF_GLYPHS = {"em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae",
                "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "ga": "`", "ti": "~", "ha": "^",
                "rs": "\\", "sl": "/", "mu": "\u00d7", "de": "\u00b0", "+-": "\u00b1", "<=": "<=", ">=": ">=",
                "R": "\u00ae", "Tm": "(TM)"}
# Single-character escapes that print something; the rest (\&, \c, \|, \^, \%, \d, \u, ...) print nothing.
_ROFF_CHARACTERS = {"-": "-", "e": "\\", "E": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`",
                    ".": ".", "t": "\t"}
_ROFF_ESCAPE = re.compile(r"""\\(?:
      "[^\n]*                                    # comment, to the end of the line
    | [fF](?:\[[^\]]*\]|\(..|.)                  # font change
    | s(?:[+-]?\d|\(\d\d|\[[^\]]*\])             # size change
    | [hvwlLoDXZbxRAB]'[^']*'                    # motion, width, drawing: no text of their own
    | [nkgmMVY$](?:\[[^\]]*\]|\(..|.)            # registers, colours, environment, macro arguments
    | \((?P<glyph>..)                            # glyph: \(em
    | \[(?P<named_glyph>[^\]]*)\]               # glyph by name: \[em] \[u00E9]
    | \*(?:\[(?P<named_string>[^\]]*)\]|\((?P<string>..)|(?P<short_string>.))  # predefined string: \*(lq \*R
    | (?P<char>.)?                                # a lone backslash ends a continued line
)""", re.VERBOSE)
_ROFF_GLYPH_GROUPS = ("glyph", "named_glyph", "named_string", "string", "short_string")
_ROFF_REQUEST = re.compile(r"[.'][ \t]*(?P<name>\S*)[ \t]*(?P<args>.*)")
_ROFF_ARGUMENT = re.compile(r'"([^"]*)"?|(\S+)')  # a quoted argument may hold spaces
_PARAGRAPH_REQUESTS = frozenset({"PP", "LP", "P", "TP", "IP", "HP", "sp", "Pp"})
_HEADING_REQUESTS = frozenset({"SH", "SS", "Sh", "Ss"})
_SPACED_FONT_REQUESTS = frozenset({"B", "I", "SM", "SB"})
_ALTERNATING_FONT_REQUESTS = frozenset({"BR", "RB", "IR", "RI", "BI", "IB"})


def _roff_output_lines(source_line: str) -> list[str]:
    """Lines of text for one source line; "" marks a paragraph break."""
    request = _ROFF_REQUEST.fullmatch(source_line)
    if request is None:
        return [_roff_unescape(source_line).rstrip()]
    name = request["name"]
    arguments = [quoted or bare for quoted, bare in _ROFF_ARGUMENT.findall(request["args"])]
    if name in _HEADING_REQUESTS:
        return ["", _roff_unescape(" ".join(arguments))]
    if name in _PARAGRAPH_REQUESTS:
        # .IP's first argument is the item's tag (a bullet, a number, an option).
        tag = _roff_unescape(arguments[0]) if name == "IP" and arguments else ""
        return ["", tag] if tag else [""]
    # A font request without arguments applies to the next line, which carries the text.
    if name in _SPACED_FONT_REQUESTS and arguments:
        return [_roff_unescape(" ".join(arguments)).rstrip()]
    if name in _ALTERNATING_FONT_REQUESTS and arguments:
        return [_roff_unescape("".join(arguments)).rstrip()]
    return []  # comments, the title line, layout and macro requests


def _roff_unescape(text: str) -> str:
    return _ROFF_ESCAPE.sub(_roff_escape_text, text)


def _roff_escape_text(escape: re.Match[str]) -> str:
    glyph = next((escape[group] for group in _ROFF_GLYPH_GROUPS if escape[group] is not None), None)
    if glyph is not None:
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", glyph):
            return chr(int(glyph[1:], 16))
        return _ROFF_GLYPHS.get(glyph, "")
    return _ROFF_CHARACTERS.get(escape["char"] or "", "")
