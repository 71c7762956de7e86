"""The CSV reader behind uploads: parsed and validated as the chunks arrive, no database.

An upload is read in chunks of ``CHUNK_BYTES`` and validated as the chunks arrive, so a hostile
file is refused after its first bad chunk instead of after the whole file was decoded and split
(a 50 MB header of 25 million fields once cost about 900 MB before the 422). The caps checked
while streaming: ``MAX_COLUMNS`` header fields and ``MAX_LINE_BYTES`` bytes per physical line.
``parse_csv`` returns the columns' descriptions and the row count, or raises Invalid naming the
line and what to fix; ``service.store.datasets`` stores what it accepted.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, compress, repeat
from operator import itemgetter, not_
from typing import Any

from seqtune.errors import Invalid

MAX_COLUMNS = 4096
# A physical line (between line breaks) longer than this is refused as it streams in. The
# widest legitimate header is MAX_COLUMNS names of up to 128 characters (about 530 KB); data
# lines of 4096 numbers are a fraction of that. The cap bounds what one line can cost.
MAX_LINE_BYTES = 1024 * 1024
# How much of an upload is read, decoded and checked at a time.
CHUNK_BYTES = 1024 * 1024
# Rows are checked column by column in batches of about this many fields: large enough that
# the per-value work runs in C (map/compress over a column), small enough to bound memory
# whatever the number of columns.
_BATCH_FIELDS = 1 << 18
_MISSING = frozenset({"", "nan", "na", "null"})
# Regular expressions over a column's values joined by newlines: one C-level pass proves what
# the value-by-value rules would find, for the common cases. Each accepts only values the rules
# accept the same way (anything else takes the value-by-value path): _WS is what str.strip()
# removes (\s is str.isspace()) but the newline; _NUM is a plain decimal that float() parses,
# finite by construction (at most 200 integer digits, a two-digit exponent); _MISS is "nan",
# "na" or "null" in any case (no other character lowercases to these ASCII letters).
_WS = r"[^\S\n]"
_NUM = r"[+-]?(?:[0-9]{1,200}(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,2})?"
_MISS = r"(?:[nN][aA][nN]?|[nN][uU][lL][lL])"
_NUMBERS = re.compile(rf"(?:{_WS}*+{_NUM}{_WS}*+\n)*+{_WS}*+{_NUM}{_WS}*+")
_NUMBERS_OR_MISSING = re.compile(
    rf"(?:{_WS}*+(?:(?:{_NUM}|{_MISS}){_WS}*+)?\n)*+{_WS}*+(?:(?:{_NUM}|{_MISS}){_WS}*+)?"
)
_MISSING_LINE = re.compile(rf"^{_WS}*+(?:{_MISS}{_WS}*+)?$", re.MULTILINE)


def _fail(line: int, reason: str) -> Invalid:
    return Invalid(
        f"line {line}: {reason}", details=[{"field": "file", "line": line, "reason": reason}]
    )


class _ByteChecks:
    r"""The checks made on raw chunks before their rows are parsed: UTF-8, NUL bytes, the
    line-length cap and (while the header line streams in) the column cap.

    ``chunks`` yields the input's chunks; iterating a ``_ByteChecks`` yields it decoded as text
    in blocks of whole lines (a block ends with a line break, ``\n``, ``\r\n`` or ``\r``, except
    the file's last when the file does not). A leading UTF-8 byte-order mark is dropped. Raises
    ``Invalid`` at the first chunk that breaks a rule.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._fed = 0  # bytes given to the decoder so far
        self._line = 1  # the physical line the next byte belongs to
        self._line_len = 0  # bytes of that line seen so far
        self._after_cr = False  # the last chunk ended with \r (maybe half of a \r\n)
        self._header_commas = 0
        self._header_quoted = False
        self._first = True

    def _decode(self, chunk: bytes, final: bool = False) -> str:
        pending = len(self._decoder.getstate()[0])
        try:
            out = self._decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            # exc.start counts from the decoder's buffered bytes, which precede this chunk.
            at = self._fed - pending + exc.start
            raise Invalid(f"the file is not UTF-8 text (byte {at}); save it as UTF-8 CSV") from None
        self._fed += len(chunk)
        if self._first and out:
            self._first = False
            out = out.removeprefix("\ufeff")
        return out

    def _check(self, chunk: bytes) -> None:
        if b"\x00" in chunk:
            raise Invalid("the file contains NUL bytes; it is not a text CSV")
        data = chunk
        if self._after_cr and data[:1] == b"\n":
            data = data[1:]  # the second half of a \r\n split between chunks: no new line
        self._after_cr = chunk.endswith(b"\r")
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pieces = data.split(b"\n")
        if self._line == 1:
            # Count the header's fields as they arrive; quotes may hide commas, so a quoted
            # header is left to the line cap and the exact count after parsing.
            head = pieces[0]
            self._header_quoted = self._header_quoted or b'"' in head
            self._header_commas += head.count(b",")
            if not self._header_quoted and self._header_commas + 1 > MAX_COLUMNS:
                raise _fail(1, f"more than {MAX_COLUMNS} columns")
        first = self._line_len + len(pieces[0])
        if first > MAX_LINE_BYTES:
            raise _line_too_long(self._line)
        if len(pieces) == 1:
            self._line_len = first
            return
        if max(map(len, pieces[1:-1]), default=0) > MAX_LINE_BYTES:
            i = next(i for i, p in enumerate(pieces[1:-1], 1) if len(p) > MAX_LINE_BYTES)
            raise _line_too_long(self._line + i)
        self._line += len(pieces) - 1
        self._line_len = len(pieces[-1])
        if self._line_len > MAX_LINE_BYTES:
            raise _line_too_long(self._line)

    def __iter__(self) -> Iterator[str]:
        carry = ""
        for chunk in self._chunks:
            if not chunk:
                continue
            text_ = carry + self._decode(chunk)
            self._check(chunk)
            # Hand on whole lines only; hold back a final \r, which may start a \r\n.
            end = len(text_) - 1 if text_.endswith("\r") else len(text_)
            cut = max(text_.rfind("\n", 0, end), text_.rfind("\r", 0, end)) + 1
            carry = text_[cut:]
            if cut:
                yield text_[:cut]
        carry += self._decode(b"", final=True)
        if carry:
            yield carry


def _line_too_long(line: int) -> Invalid:
    return _fail(line, f"the line is longer than {MAX_LINE_BYTES} bytes (the line-length cap)")


def _chunked(content: bytes) -> Iterator[bytes]:
    view = memoryview(content)
    for i in range(0, len(content), CHUNK_BYTES):
        yield bytes(view[i : i + CHUNK_BYTES])


def parse_csv(content: bytes | Iterable[bytes]) -> tuple[list[dict[str, Any]], int]:
    """Validate a CSV upload and describe it.

    ``content`` is the whole file or its chunks in order (any sizes); it is read one chunk at
    a time and the first problem ends the read, so a hostile file costs about one chunk.

    The first line is the header. A column is numeric when its first non-empty value parses as
    a number; every later value in it must then be a number or empty (a missing value). Other
    columns are text (timestamps, class labels). Returns ``(columns, n_rows)`` where columns are
    ``{name, type, missing}``. Raises ``Invalid`` naming the line and the reason; row problems
    are reported in file order. The caps: ``MAX_COLUMNS`` columns and ``MAX_LINE_BYTES`` bytes
    per line (and per record, for a quoted field with line breaks), checked as bytes arrive.
    """
    chunks = _chunked(content) if isinstance(content, bytes | bytearray) else content
    state = _CsvState()
    for block in _ByteChecks(chunks):
        state.block(block)
    return state.finish()


class _CsvState:
    r"""``parse_csv``'s state across blocks of whole lines.

    Two paths give the same answers. The exact one is ``csv.reader`` record by record: the
    header's block, every record with a quote, a run of lines with a blank line or a wrong field
    count, a block with lone ``\r`` line breaks. The fast one takes a run of lines without
    quotes in which every line has the header's number of commas: its fields are the run split
    at commas and newlines, and a column is a slice of them, so no Python code runs per row or
    per value. A block is cut into such runs around its quoted records. Rows are checked in file
    order; line numbers count lines as ``csv.reader.line_num`` does (a record's last line).
    """

    def __init__(self) -> None:
        self.line = 0  # lines consumed so far
        self.pending = ""  # the lines of a record that goes on in the next block
        self.header: list[str] | None = None
        self.columns: _Columns | None = None

    def block(self, block: str) -> None:
        if self.pending:
            block, self.pending = self.pending + block, ""
        if (
            self.columns is None
            or ("\r" in block and "\r" in block.replace("\r\n", ""))
            or block.count('"') > block.count("\n") // 8
        ):
            # The header; lines csv splits at a lone \r; or quotes in many lines, where one
            # reader for the block beats one per quoted record.
            self._exact(block, final=False)
            return
        at, end = 0, len(block)
        while at < end:
            quote = block.find('"', at)
            # The run of whole lines before the line with the next quote has no quotes.
            stop = end if quote < 0 else max(at, block.rfind("\n", at, quote) + 1)
            if stop > at:
                run = block[at:stop]
                if not self._fast(run):
                    self._exact(run, final=False)  # no quote: no record left unfinished
                at = stop
            if quote >= 0:
                after = self._quoted_record(block, at)
                if after is None:  # it goes on in the next block
                    self._keep_pending(block[at:])
                    return
                at = after

    def finish(self) -> tuple[list[dict[str, Any]], int]:
        if self.pending:
            self._exact(self.pending, final=True)
        if self.header is None or self.columns is None:
            raise _fail(1, "the file is empty; the first line must be a header")
        cols = self.columns
        if cols.n_rows == 0:
            raise _fail(2, "the file has a header but no data rows")
        if "numeric" not in cols.types:
            raise Invalid("no numeric column found; a dataset needs at least one")
        return (
            [
                {"name": h, "type": t or "numeric", "missing": m}
                for h, t, m in zip(self.header, cols.types, cols.missing, strict=True)
            ],
            cols.n_rows,
        )

    def _set_header(self, row: list[str]) -> None:
        header = [h.strip() for h in row]
        if not header or all(h == "" for h in header):
            raise _fail(1, "the header line is empty")
        if len(header) > MAX_COLUMNS:
            raise _fail(1, f"more than {MAX_COLUMNS} columns")
        for h in header:
            if h == "":
                raise _fail(1, "a column has an empty name")
            if len(h) > 128:
                raise _fail(1, f"column name '{h[:20]}...' is longer than 128 characters")
        dupes = {h for h, n in Counter(header).items() if n > 1}
        if dupes:
            raise _fail(1, f"duplicate column name(s): {sorted(dupes)}")
        self.header = header
        self.columns = _Columns(header)

    def _keep_pending(self, lines: str) -> None:
        """Keep the start of a record that goes on in the next block, within the cap."""
        if len(lines.encode()) > MAX_LINE_BYTES:
            raise _fail(
                self.line + 1,
                "a record (a quoted field with line breaks) is longer "
                f"than {MAX_LINE_BYTES} bytes (the line-length cap)",
            )
        self.pending = lines

    def _take(self, row: list[str], line: int) -> bool:
        """Whether ``row`` (ending on ``line``) is a data row: False for the header and blank
        lines; ``Invalid`` for a wrong number of fields."""
        if self.columns is None:
            self._set_header(row)
            return False
        width = len(self.columns.header)
        n = len(row)
        if n != width or n == 1:
            if n == 0 or (n == 1 and row[0].strip() == ""):
                return False  # blank line
            if n != width:
                raise _fail(line, f"{n} fields, but the header has {width}")
        return True

    def _quoted_record(self, block: str, start: int) -> int | None:
        """Read the one record at ``start`` of ``block`` with ``csv.reader``; the offset after
        it, or None when it goes on past the block."""
        end = len(block)
        pos = start
        ran_out: list[bool] = []

        def lines() -> Iterator[str]:  # the block's lines from ``start``, read only as needed
            nonlocal pos
            while pos < end:
                nl = block.find("\n", pos)
                stop = end if nl < 0 else nl + 1
                line, pos = block[pos:stop], stop
                yield line
            ran_out.append(True)  # reached only when a record wants a line past the block

        reader = csv.reader(lines())
        try:
            row = next(reader)
        except csv.Error as exc:
            raise _fail(self.line + reader.line_num, f"malformed CSV: {exc}") from None
        if ran_out:
            return None
        self.line += reader.line_num
        if self._take(row, self.line):
            assert self.columns is not None
            self.columns.add([[v] for v in row], [self.line])
        return pos

    def _exact(self, block: str, *, final: bool) -> None:
        """Read ``block``'s records with ``csv.reader``. Unless ``final``, a record that goes
        on past the block (a quoted field with line breaks) is kept for the next block."""
        lines_ = io.StringIO(block, newline="").readlines()
        ran_out: list[bool] = []

        def beyond() -> Iterator[str]:  # reached only when a record wants a line past the block
            ran_out.append(True)
            yield from ()

        reader = csv.reader(chain(lines_, beyond()))
        done = 0  # the block's lines read into whole records
        rows: list[list[str]] = []
        lines: list[int] = []
        width = -1 if self.columns is None else len(self.columns.header)
        batch = max(1, _BATCH_FIELDS // max(width, 1))
        try:
            for row in reader:
                if ran_out and not final:
                    self._keep_pending("".join(lines_[done:]))
                    break
                done = reader.line_num
                # (the common row, a full one, without a call: this loop runs once per row)
                if (len(row) != width or width == 1) and not self._take(row, self.line + done):
                    if width < 0 and self.columns is not None:  # that was the header
                        width = len(self.columns.header)
                        batch = max(1, _BATCH_FIELDS // width)
                    continue
                rows.append(row)
                lines.append(self.line + done)
                if len(rows) >= batch:
                    self._add_rows(rows, lines)
                    rows, lines = [], []
        except csv.Error as exc:
            raise _fail(self.line + reader.line_num, f"malformed CSV: {exc}") from None
        finally:
            self._add_rows(rows, lines)  # also when raising: an earlier row's problem first
        self.line += done

    def _add_rows(self, rows: list[list[str]], lines: list[int]) -> None:
        if rows and self.columns is not None:
            # Column by column with itemgetter rather than zip(*rows): zip makes one iterator
            # object per row, and that many new objects set the garbage collector off.
            self.columns.add([list(map(itemgetter(i), rows)) for i in range(len(rows[0]))], lines)

    def _fast(self, run: str) -> bool:
        r"""Check the whole lines of ``run`` (no quote, no lone \r) on the fast path; False,
        with nothing done, when they need the exact one."""
        assert self.columns is not None
        if "\r" in run:
            run = run.replace("\r\n", "\n")
        body = run[:-1] if run.endswith("\n") else run
        lines = body.split("\n")
        width = len(self.columns.header)
        if width > 1:
            commas = list(map(str.count, lines, repeat(",", len(lines))))
            if commas.count(width - 1) != len(lines):
                return False  # blank lines or a wrong field count: the exact path says which
            fields = body.replace("\n", ",").split(",")
            columns = [fields[i::width] for i in range(width)]
        else:
            if "," in body or not all(map(str.strip, lines)):
                return False
            columns = [lines]
        self.columns.add(columns, range(self.line + 1, self.line + 1 + len(lines)))
        self.line += len(lines)
        return True


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


class _Columns:
    """Column types and missing counts, checked a batch of rows at a time.

    The rules of ``parse_csv`` per value (stripped; "", nan, na, null in any case are missing;
    a column's first present value decides numeric or text; a numeric column then takes only
    finite numbers), applied a column at a time with C-level ``map``s: the same answers as a
    value-by-value loop at a fraction of its cost.
    """

    def __init__(self, header: list[str]) -> None:
        self.header = header
        self.types: list[str | None] = [None] * len(header)
        self.missing = [0] * len(header)
        self.n_rows = 0

    def add(self, columns: list[list[str]], lines: Sequence[int]) -> None:
        """Check a batch of rows given as its ``columns`` (``lines[i]`` is row i's line
        number). Raises ``Invalid`` for the first bad value in file order."""
        first_bad: tuple[int, int, str] | None = None  # (row index, column, value)
        for i, col in enumerate(columns):
            if self.types[i] != "text":
                joined = "\n".join(col)
                # (only when no value has a line break of its own: then a line is a value)
                if joined.count("\n") == len(col) - 1:
                    if _NUMBERS.fullmatch(joined):  # all numbers, none missing
                        self.types[i] = "numeric"
                        continue
                    if _NUMBERS_OR_MISSING.fullmatch(joined):
                        n_missing = len(_MISSING_LINE.findall(joined))
                        self.missing[i] += n_missing
                        if n_missing < len(col):  # a present value, and each one a number
                            self.types[i] = "numeric"
                        continue
            values = list(map(str.strip, col))
            flags = list(map(_MISSING.__contains__, map(str.lower, values)))
            n_missing = sum(flags)
            self.missing[i] += n_missing
            if self.types[i] == "text":
                continue
            present = list(compress(values, map(not_, flags))) if n_missing else values
            if not present:
                continue
            if self.types[i] is None:
                self.types[i] = "numeric" if _is_number(present[0]) else "text"
                if self.types[i] == "text":
                    continue
            try:
                ok = all(map(math.isfinite, map(float, present)))
            except ValueError:
                ok = False
            if not ok:  # rare: find the offending row, value by value
                r = next(
                    r
                    for r, (v, m) in enumerate(zip(values, flags, strict=True))
                    if not m and not _is_number(v)
                )
                if first_bad is None or r < first_bad[0]:
                    first_bad = (r, i, values[r])
        if first_bad is not None:
            r, i, value = first_bad
            raise _fail(lines[r], f"column '{self.header[i]}' is numeric but has '{value[:40]}'")
        self.n_rows += len(columns[0]) if columns else 0
