"""The fuzz harness: a registry of the pack's readers and the one rule every input must meet.

A :class:`Reader` says, in a few lines, how to write valid inputs (``make``), how to call the entry point under
test (``load``), what a working load is (``works``: a forward pass, a LoRA that patches, a batch that reads) and
how to break an input (``mutate``). :func:`run_case` copies a valid input, mutates it and classifies what the
reader does with it:

* ``typed``: a :class:`~distilled_unets.models.errors.PackError` whose message names the file (and, for a node,
  whose ``node`` and ``input_name`` are that node's and input's);
* ``working``: the call returned and ``works`` accepted the result.

Anything else fails the test, with what Hypothesis drew to make the input: a raw exception, a hang (a case
that runs past :data:`CASE_SECONDS`), an allocation beyond :data:`CASE_MEMORY` (the address space of the
process is capped while a case runs, so an absurd shape fails the allocation instead of killing the process),
or code run (a pickled payload created :data:`_mutate.SENTINEL`).

Counts per reader and outcome are kept in :data:`STATS` and printed at the end of the session (see
``tests/fuzz/conftest.py``; ``--fuzz-report FILE`` writes them as JSON).
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import itertools
import os
import resource
import shutil
import signal
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from distilled_unets.models.errors import PackError
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from . import _mutate as M

#: a case that runs longer is a hang
CASE_SECONDS = 60
#: what a case may allocate on top of the process's address space when it starts
CASE_MEMORY = 3 << 30

#: reader name -> outcome ("typed", "working", or a failure kind) -> count; per mutation family in FAMILIES
STATS: dict[str, Counter] = defaultdict(Counter)
FAMILIES: dict[str, Counter] = defaultdict(Counter)


@dataclass(frozen=True)
class Reader:
    """One reader of the pack under fuzzing.

    ``make(folder) -> {variant: path}`` writes valid inputs (files or folders) once per session;
    ``load(path)`` is the entry point under test (its result goes to ``works``, which raises unless it is a
    working model); ``mutate(draw, src, case) -> label`` writes a broken copy of the valid input ``src`` at
    ``case`` (:func:`by_kind` makes one from mutations of bytes). ``node`` and
    ``names``: the (node, input) pairs a typed error may name when a node reads the input (empty: a host-free
    reader, whose errors name the file only). ``host``: needs ComfyUI. ``setup(workdir)``: a context the cases
    run in (e.g. ``workdir`` registered as a ComfyUI models folder, where the cases are written). ``refused``:
    variants that are refused by design even unmutated (a pickled LoRA). ``ci_cases``: inputs per run unless
    ``--fuzz-cases`` says otherwise (fewer where a working load costs a forward pass or a resumed run).
    ``check_only``: variants that are only checked to be working loads, never mutated (a full-size network whose
    every mutated copy would cost seconds; the same checks run on its tiny variants).
    """

    name: str
    make: Callable[[Path], dict[str, Path]]
    load: Callable[[Path], object]
    works: Callable[[object], None]
    mutate: Callable[[Callable, Path, Path], str]
    names: tuple[tuple[str, str], ...] = ()
    host: bool = False
    setup: Callable[[Path], contextlib.AbstractContextManager] | None = None
    refused: tuple[str, ...] = ()
    ci_cases: int = 200
    check_only: tuple[str, ...] = ()

    def context(self, workdir: Path) -> contextlib.AbstractContextManager:
        return self.setup(workdir) if self.setup else contextlib.nullcontext()


REGISTRY: dict[str, Reader] = {}


def register(reader: Reader) -> Reader:
    assert reader.name not in REGISTRY, reader.name
    REGISTRY[reader.name] = reader
    return reader


# ------------------------------------------------------------------------------------------------
# mutating inputs


@functools.lru_cache(maxsize=64)
def _bytes(src: Path) -> bytes:
    """The bytes of a valid input file (written once per session, read once)."""
    return src.read_bytes()


def by_kind(safetensors: M.Mutation | None = None, json_: M.Mutation | None = None,
            torch_: M.Mutation | None = None, npz: M.Mutation | None = None) -> Callable:
    """A ``mutate(draw, src, case)`` for files and folders: a file is written to ``case`` mutated by its kind (by
    extension; files of a kind without a mutation get the generic ones); a folder is copied to ``case``, then
    loses a file, gains a stray one, or has one of its files mutated."""
    kinds = {".safetensors": safetensors or M.safetensors_file(), ".json": json_ or M.json_file,
             ".pkl": torch_ or M.any_file, ".ckpt": torch_ or M.any_file, ".pt": torch_ or M.any_file,
             ".pth": torch_ or M.any_file, ".npz": npz or M.npz_file, ".txt": M.text_file}

    def file(draw, src: Path, case: Path) -> str:
        data, label = kinds.get(src.suffix, M.any_file)(draw, _bytes(src))
        case.write_bytes(data)
        return label

    def mutate(draw, src: Path, case: Path) -> str:
        if src.is_file():
            return file(draw, src, case)
        shutil.copytree(src, case)
        files = sorted(p for p in case.rglob("*") if p.is_file())
        what = draw(st.sampled_from(["file"] * 6 + ["remove", "stray"]), label="folder mutation")
        if what == "remove":
            draw(st.sampled_from(files), label="remove").unlink()
            return "folder: a file removed"
        if what == "stray":
            name = draw(st.sampled_from(["diffusion_pytorch_model.fp16.safetensors", "model.safetensors",
                                         "shard_0099.pkl", "notes.txt", "x.part"]), label="stray file")
            (case / name).write_bytes(draw(st.binary(max_size=64), label="stray bytes"))
            return "folder: stray file"
        target = draw(st.sampled_from(files), label="file")
        return file(draw, src / target.relative_to(case), target)
    return mutate


# ------------------------------------------------------------------------------------------------
# running one case


class Hang(BaseException):
    """Raised in a case that ran past its time (a BaseException: ``except Exception`` in the pack cannot
    swallow it)."""


@contextlib.contextmanager
def limits(seconds: float | None = None, memory: int | None = None):
    """A time limit (SIGALRM) and an address-space cap (RLIMIT_AS) around a case. SIGALRM cannot stop code that
    never returns to Python; past twice the limit ``faulthandler`` prints every thread's stack and ends the
    process, so even such a hang fails the run instead of stalling it."""
    seconds = CASE_SECONDS if seconds is None else seconds
    memory = CASE_MEMORY if memory is None else memory

    def on_alarm(signum, frame):
        raise Hang(f"the case ran past {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_as = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * resource.getpagesize()
    cap = vm + memory
    if old_as[1] != resource.RLIM_INFINITY:
        cap = min(cap, old_as[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, old_as[1]))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(2 * seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, old_as)
        signal.signal(signal.SIGALRM, old_handler)


def _is_memory_error(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or ("can't allocate memory" in str(e) or "out of memory" in str(e).lower())


class CaseFailure(AssertionError):
    pass


def memory_cause(e: BaseException) -> BaseException | None:
    """The allocation failure a typed error was raised from, if any (a reader that catches everything must not
    turn an allocation beyond the cap into a refusal: without the cap the process would have been killed)."""
    seen = {id(e)}
    e = e.__cause__ or e.__context__
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _is_memory_error(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def check_typed(reader: Reader, e: PackError, case: Path) -> None:
    mem = memory_cause(e)
    if mem is not None:
        raise CaseFailure(f"{reader.name}: memory: the typed error was raised from an allocation beyond the cap "
                          f"({type(mem).__name__}: {str(mem)[:200]}): {e}")
    msg = str(e)
    if case.name not in msg:
        raise CaseFailure(f"{reader.name}: the typed error does not name the file {case.name}: {msg}")
    if reader.names and (e.node, e.input_name) not in reader.names:
        raise CaseFailure(f"{reader.name}: the typed error names node {e.node!r}, input {e.input_name!r} (want one "
                          f"of {reader.names}): {msg}")


def classify(reader: Reader, case: Path) -> str:
    """Run ``reader`` on ``case``: 'typed' or 'working', or raise :class:`CaseFailure` saying what went wrong."""
    if os.path.exists(M.SENTINEL):
        os.remove(M.SENTINEL)
    try:
        try:
            with limits():
                result = reader.load(case)
        except PackError as e:
            check_typed(reader, e, case)
            return "typed"
        try:
            with limits():
                reader.works(result)
        except PackError as e:
            raise CaseFailure(f"{reader.name}: the load returned, then using the result raised {e!r}") from e
        return "working"
    except CaseFailure:
        raise
    except Hang as e:
        raise CaseFailure(f"{reader.name}: hang ({e})") from e
    except AssertionError as e:
        raise CaseFailure(f"{reader.name}: the load returned something that does not work: {e}") from e
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        kind = "memory" if _is_memory_error(e) else "raw exception"
        raise CaseFailure(f"{reader.name}: {kind}: {type(e).__name__}: {e}\n{traceback.format_exc()}") from e
    finally:
        if os.path.exists(M.SENTINEL):
            os.remove(M.SENTINEL)
            raise CaseFailure(f"{reader.name}: a pickled payload ran code (the sentinel file was created)")


def copy_input(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst


def case_name(n: int, src: Path) -> str:
    """A name unique to the case that keeps what the reader looks at (the extension)."""
    return f"case{n:05d}-{src.name}"


def run_case(reader: Reader, draw, variants: dict[str, Path], workdir: Path, n: int) -> str:
    """One fuzz case: copy a drawn valid input into ``workdir``, mutate it, run the reader, count the outcome.
    Returns the outcome; a failure raises :class:`CaseFailure` whose message ends with what was drawn to make the
    input."""
    drawn: list[str] = []

    def recorded(strategy, label=None):
        v = draw(strategy, label=label)
        r = repr(v)
        drawn.append(f"{label or '?'}={r if len(r) < 80 else r[:77] + '...'}")
        return v

    variant = recorded(st.sampled_from(sorted(v for v in variants if v not in reader.check_only)), label="valid input")
    src = variants[variant]
    name = case_name(n, src)
    case = workdir / name
    try:
        label = reader.mutate(recorded, src, case)
        try:
            out = classify(reader, case)
        except CaseFailure as e:
            STATS[reader.name]["failed"] += 1
            raise CaseFailure(f"{e}\ninput: {label}; drawn: {', '.join(drawn)}") from e.__cause__
        STATS[reader.name][out] += 1
        FAMILIES[reader.name][label] += 1
        return out
    finally:
        if case.is_dir():
            shutil.rmtree(case, ignore_errors=True)
        elif case.exists():
            case.unlink()


def fuzz(reader: Reader, variants: dict[str, Path], workdir: Path, cases: int, seed_: int) -> None:
    """``cases`` inputs through ``reader``, drawn by Hypothesis from ``seed_`` and the reader's name (readers of
    similar files get different draws), written under ``workdir`` (inside ``reader.context``). Every case runs;
    the failures are listed at the end, each with the draws that made its input (no shrinking: the draws are the
    reproducer)."""
    counter = itertools.count()
    failures: list[str] = []

    @seed(f"{seed_}:{reader.name}")
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(st.data())
    def one(data):
        try:
            run_case(reader, data.draw, variants, workdir, next(counter))
        except CaseFailure as e:
            failures.append(str(e))

    before = STATS[reader.name].copy()
    with reader.context(workdir):
        one()
    ran = STATS[reader.name] - before
    if failures:
        shown = int(os.environ.get("DISTILLED_UNETS_FUZZ_SHOW", "20"))
        pytest.fail(f"{len(failures)} of {sum(ran.values())} inputs failed:\n\n" + "\n\n".join(failures[:shown]),
                    pytrace=False)
    assert ran["typed"] + ran["working"] == sum(ran.values()) > 0
    if cases >= 50:  # the mutations reach both ends: refusals, and loads that work
        assert ran["typed"] and ran["working"], dict(ran)


def check_valid(reader: Reader, variants: dict[str, Path], workdir: Path) -> None:
    """Every unmutated input is a working load (but those refused by design): the 'working' outcome is real."""
    with reader.context(workdir):
        for n, (variant, src) in enumerate(sorted(variants.items())):
            case = copy_input(src, workdir / case_name(n, src))
            want = "typed" if variant in reader.refused else "working"
            assert classify(reader, case) == want, variant
