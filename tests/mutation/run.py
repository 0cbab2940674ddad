"""Mutation testing of fastai_tricks' pure maths (issue #15).

Two modes, one script:

``python tests/mutation/run.py [MODULE ...]``
    The full run. mutmut 3 (configured by ``[tool.mutmut]`` in pyproject.toml) writes every mutant
    of the pure modules into a scratch copy of the project; this script then runs, in one pytest
    process, each mutant against the tests of its module that call the mutated function, fastest
    first, stopping at the first failure. It prints the score per module as a Markdown table (the one
    in docs/guarantees.md) and the surviving mutants, and exits 1 when a module is below 90 % of its
    non-equivalent mutants killed. Equivalent mutants are listed, with the reason, in
    tests/mutation-equivalent.md. ``--results FILE`` saves every verdict (every 25 mutants, so a
    stopped run keeps what it judged) and ``--report FILE`` prints the table of such a file; after
    adding tests, ``--recheck FILE`` judges only the mutants that FILE does not record as killed,
    a quick check before the full run whose score is published.

``python tests/mutation/run.py --sample``
    The CI check: applies ``SAMPLE``, a fixed list of hand-written mutations of the maths, one at a
    time (the function's code is swapped in place and put back), runs the tests named for each, and
    fails unless every one of them is killed. It needs no mutmut and takes well under a minute.

Running every mutant in one process, rather than mutmut's own ``mutmut run`` (which forks a pytest per
mutant and also works with the same table), makes the full run several times faster: a killed mutant
costs only its killing test. Hypothesis runs the ``ci`` profile's derandomized examples, without
shrinking.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import fnmatch
import inspect
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_ANNOTATIONS = __import__("__future__").annotations.compiler_flag
PACKAGE = "fastai_tricks"
EQUIVALENT_FILE = ROOT / "tests" / "mutation-equivalent.md"
TARGET = 0.90

#: The pure functions of each module that are mutated, and the test files that may kill them.
SCOPE: dict[str, dict[str, list[str]]] = {
    "mix_ops": {
        "functions": ["*"],
        "tests": ["tests/test_mix_ops.py", "tests/test_mix_ops_fidelity.py", "tests/test_bad_input.py"],
    },
    # tta.py itself is the fastai callback; its pure parts live in tta_views.py and tta_merge.py.
    "tta_views": {
        "functions": [
            "_crop_side",
            "_check_crop",
            "_check_batch",
            "four_corner_crops",
            "view_names",
            "expand_views",
            "_resize",
            "_float32_at_most",
            "_chunk",
        ],
        "tests": ["tests/test_tta.py", "tests/test_tta_dense.py", "tests/test_bad_input.py"],
    },
    "tta_merge": {
        "functions": ["merge_views"],
        "tests": ["tests/test_tta.py", "tests/test_tta_dense.py", "tests/test_bad_input.py"],
    },
    "resizing": {
        "functions": [
            "_as_size",
            "_check_initial",
            "initial_pixels",
            "schedule_progress",
            "size_at",
            "resize_schedule",
            "_progress",
            "_check_window",
            "mix_alpha_at",
        ],
        "tests": ["tests/test_resize_schedule_properties.py", "tests/test_resizing.py", "tests/test_bad_input.py"],
    },
    "normalization": {
        "functions": ["batch_moments", "merge_moments", "moments_to_stats"],
        "tests": ["tests/test_normalization.py", "tests/test_normalization_maths.py", "tests/test_bad_input.py"],
    },
    "losses": {
        "functions": ["*"],
        "tests": ["tests/test_losses.py", "tests/test_bad_input.py"],
    },
}


@dataclass(frozen=True)
class Patch:
    """A hand-written mutation: ``old`` becomes ``new`` inside ``module.function``; ``tests`` must kill it."""

    module: str
    function: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


_FID = "tests/test_mix_ops_fidelity.py::"
_SCHED = "tests/test_resize_schedule_properties.py::"

#: The CI sample: the hand-made mutations of issue #15 that survived the old tests, and one per other module.
SAMPLE: tuple[Patch, ...] = (
    Patch("mix_ops", "box_masks", "(rows < b[:, 1])", "(rows <= b[:, 1])", (_FID + "test_box_masks",), "off by one"),
    Patch(
        "mix_ops",
        "sample_boxes",
        "torch.round(cut * height)",
        "torch.floor(cut * height)",
        (_FID + "test_cutmix_box_sides",),
        "box side rounded down",
    ),
    Patch(
        "mix_ops",
        "resizemix_geometry",
        "round(tau * height)",
        "int(tau * height)",
        (_FID + "test_resizemix_patch_side",),
        "patch side rounded down",
    ),
    Patch(
        "mix_ops", "fmix_masks", "(noise >= thresh)", "(noise > thresh)", (_FID + "test_fmix_mask_pastes",), "strict"
    ),
    Patch(
        "mix_ops",
        "sample_lambda",
        "lam.clamp_(0.0, 1.0)",
        "lam.clamp_(0.0, 0.999)",
        (_FID + "test_lambda_reaches_both_ends",),
        "λ capped below 1",
    ),
    Patch(
        "mix_ops",
        "sample_lambda",
        "torch.full((n, 2), alpha,",
        "torch.full((n, 2), 1.0 / alpha,",
        (_FID + "test_lambda_draws_follow_beta",),
        "α inverted",
    ),
    Patch(
        "mix_ops",
        "fourier_noise",
        "clamp_(min=1.0 / max(height, width))",
        "clamp_(min=1.0)",
        (_FID + "test_fmix_masks_are_low_frequency", _FID + "test_fourier_noise_power"),
        "frequency floor so high the noise is white",
    ),
    Patch(
        "mix_ops",
        "sample_boxes",
        "(centre[:, 0] * height)",
        "(centre[:, 0] * (height - 1))",
        (_FID + "test_cutmix_box_centre",),
        "centre never on the last row",
    ),
    Patch(
        "resizing",
        "size_at",
        "math.floor((i + (f - i) * t) / increase_by)",
        "math.ceil((i + (f - i) * t) / increase_by)",
        (_SCHED + "test_schedule_grows_linearly", _SCHED + "test_size_at_by_hand"),
        "intermediate sizes rounded up",
    ),
    Patch(
        "normalization",
        "merge_moments",
        "delta.square() * (a.count * b.count / n)",
        "delta.square() * (a.count * b.count / (n - 1))",
        ("tests/test_normalization.py",),
        "Chan's update off by one",
    ),
    Patch(
        "losses",
        "smooth_targets",
        "off = eps / n_classes",
        "off = eps / max(n_classes - 1, 1)",
        ("tests/test_losses.py",),
        "smoothing spread over K - 1 classes",
    ),
    Patch(
        "tta_merge",
        "merge_views",
        "logp.logsumexp(0) - math.log(n_views)",
        "logp.max(0).values",
        ("tests/test_tta.py::test_softmax_mean",),
        "mean mode takes the max",
    ),
    Patch(
        "tta_views",
        "_crop_side",
        "if side > short:",
        "if side >= short:",
        ("tests/test_tta.py::test_float_size_is_a_fraction_of_the_short_side",),
        "a crop of the whole short side refused",
    ),
    Patch(
        "tta_views",
        "_float32_at_most",
        "if float(high) > n:",
        "if float(high) >= n:",
        ("tests/test_tta.py::test_integer_views_keep_the_extremes_of_their_type_without_wrapping",),
        "integer maxima stepped down although float32 holds them",
    ),
)


# --- hypothesis: the ci profile's examples, without shrinking ------------------------------------------


def _register_mutation_profile() -> None:
    """Register ``mutation``: derandomized like ``ci``, no shrinking, no database; conftest loads it by name."""
    from hypothesis import HealthCheck, Phase, settings

    settings.register_profile(
        "mutation",
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    os.environ["HYPOTHESIS_PROFILE"] = "mutation"


# --- running test items in-process ---------------------------------------------------------------------


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: float):
    def fire(signum, frame):
        raise _Timeout(f"no result after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _run_item(item, timeout: float) -> tuple[bool, float]:
    """Run one test item (setup, call, teardown); return (passed, seconds)."""
    from _pytest.runner import runtestprotocol

    start = time.perf_counter()
    try:
        with _alarm(timeout):
            reports = runtestprotocol(item, nextitem=None, log=False)
        passed = all(r.passed or r.skipped for r in reports)
    except Exception:  # noqa: BLE001 - a timeout, or a mutant that breaks pytest's own reporting: killed.
        passed = False
        with contextlib.suppress(Exception):
            item.session._setupstate.teardown_exact(None)
    return passed, time.perf_counter() - start


def _log_verdict(session, name: str, killed: bool, detail: str, seconds: float) -> None:
    """Report a mutant to pytest as a test item of its own: passed when killed, failed when it survived.

    pytest's closing line then counts mutants ("11 passed, 1 failed"), and its exit status is 1 if any survived.
    """
    from _pytest.reports import TestReport

    report = TestReport(
        nodeid=f"mutant::{name}",
        location=("tests/mutation/run.py", 0, name),
        keywords={},
        outcome="passed" if killed else "failed",
        longrepr=None if killed else f"mutant survived: {detail}",
        when="call",
        duration=seconds,
    )
    session.config.hook.pytest_runtest_logreport(report=report)


def _pytest_main(test_files: list[str], plugin: object, rootdir: Path) -> int:
    import pytest

    args = [*test_files, "-q", "-p", "no:cacheprovider", f"--rootdir={rootdir}", "-W", "ignore"]
    return pytest.main(args, plugins=[plugin])


# --- the full run over mutmut's mutants ----------------------------------------------------------------


@dataclass
class Mutant:
    module: str
    function: str  # mangled: x_name or xǁClassǁname
    number: int
    old: str
    new: str
    status: str = "not run"
    killed_by: str = ""

    @property
    def name(self) -> str:
        return f"{PACKAGE}.{self.module}.{self.function}__mutmut_{self.number}"

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.module, _plain(self.function), self.old, self.new)


def _plain(mangled: str) -> str:
    """``x_size_at`` -> ``size_at``; ``xǁLabelSmoothingCEǁforward`` -> ``LabelSmoothingCE.forward``."""
    if mangled.startswith("xǁ"):
        return ".".join(mangled[2:].split("ǁ"))
    return mangled[2:]


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out.update({f.name: f for f in node.body if isinstance(f, ast.FunctionDef)})
    return out


def _describe(orig: str, mutated: str) -> tuple[str, str]:
    """The changed lines of a mutant, old and new, each joined into one line."""
    # The def lines differ by the mangled name; with it taken out, a mutated default value shows.
    unname = re.compile(r"__mutmut_(?:orig|\d+)\(")
    a, b = (unname.sub("(", text, count=1).splitlines() for text in (orig, mutated))
    old, new = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            old += [s.strip() for s in a[i1:i2]]
            new += [s.strip() for s in b[j1:j2]]
    clean = re.compile(r"\s*# type: ignore # mutmut generated")
    return clean.sub("", " ⏎ ".join(old)), clean.sub("", " ⏎ ".join(new))


def _in_scope(module: str, plain: str) -> bool:
    """Whether function (or method) ``plain`` of ``module`` is mutated; methods match by their own name."""
    return any(fnmatch.fnmatch(plain.rpartition(".")[2], p) for p in SCOPE[module]["functions"])


def _generate(workdir: Path, modules: list[str]) -> list[Mutant]:
    """Copy the project into ``workdir`` and write mutmut's mutants of ``modules`` to ``workdir/mutants``."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.source", "*.mutated")
    for name in (PACKAGE, "tests"):
        # Every file is copied fresh, so the modules not mutated in this run are the current ones; only the
        # mutated code of an unchanged module is reused from a kept --workdir (it takes seconds to make).
        shutil.copytree(ROOT / name, workdir / name, ignore=skip, dirs_exist_ok=True)
        shutil.copytree(ROOT / name, workdir / "mutants" / name, ignore=skip, dirs_exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    shutil.copy(ROOT / "pyproject.toml", workdir / "mutants" / "pyproject.toml")
    os.chdir(workdir)
    from mutmut.mutation.file_mutation import mutate_file_contents

    mutants = []
    for module in modules:
        path = f"{PACKAGE}/{module}.py"
        source = (workdir / path).read_text()
        t0 = time.perf_counter()
        stamp, cache = (workdir / "mutants" / f"{path}.{ext}" for ext in ("source", "mutated"))
        if stamp.exists() and cache.exists() and stamp.read_text() == source:
            code = cache.read_text()
        else:
            code = mutate_file_contents(path, source).code
            cache.write_text(code)
            stamp.write_text(source)
        (workdir / "mutants" / path).write_text(code)
        funcs = _functions(ast.parse(code))
        lines = code.splitlines()

        def text(node: ast.FunctionDef, lines=lines) -> str:
            return "\n".join(lines[node.lineno - 1 : node.end_lineno])

        found = 0
        for fname, node in funcs.items():
            m = re.fullmatch(r"(.+)__mutmut_(\d+)", fname)
            if not m or not _in_scope(module, _plain(m.group(1))):
                continue
            orig = funcs.get(f"{m.group(1)}__mutmut_orig")
            old, new = _describe(text(orig), text(node))
            mutants.append(Mutant(module, m.group(1), int(m.group(2)), old, new))
            found += 1
        print(f"{module}: {found} mutants in scope ({time.perf_counter() - t0:.0f} s to generate)", flush=True)
    return mutants


def _read_equivalents() -> dict[tuple[str, str, str, str], str]:
    """Parse tests/mutation-equivalent.md: lines ``- `module.function`: `old` → `new`: why``."""
    pattern = re.compile(r"^- `(\w+)\.([\w.]+)`: `(.*)` → `(.*)`: (.+)$")
    out = {}
    for line in EQUIVALENT_FILE.read_text().splitlines():
        m = pattern.match(line.strip())
        if m:
            out[(m[1], m[2], m[3], m[4])] = m[5]
    return out


class _MutantRunner:
    """pytest plugin: after collection, run the clean suite once (recording which function each test
    calls and how long it takes), then every mutant against the tests that call its function."""

    def __init__(self, mutants: list[Mutant], results_path: Path | None = None, timeout_factor: float = 10.0):
        self.mutants = mutants
        self.results_path = results_path
        self.timeout_factor = timeout_factor
        self.clean_failures: list[str] = []

    def pytest_runtestloop(self, session):
        from mutmut.mutation.trampoline import set_mutant_under_test
        from mutmut.state import state

        items = list(session.items)
        hits, duration = {}, {}
        set_mutant_under_test("stats")
        t0 = time.perf_counter()
        for item in items:
            state()._stats.clear()
            passed, seconds = _run_item(item, 600)
            if not passed:
                self.clean_failures.append(item.nodeid)
            hits[item.nodeid] = set(state()._stats)
            duration[item.nodeid] = seconds
        print(f"\nclean run of {len(items)} tests: {time.perf_counter() - t0:.0f} s", flush=True)
        # A test that fails on the unmutated code (e.g. one that inspects the module's source, which the
        # trampolines change) cannot judge a mutant: it is left out and reported.
        items = [it for it in items if it.nodeid not in self.clean_failures]
        t0 = time.perf_counter()
        # A fixed shuffle: a run stopped early has judged a uniform sample of the mutants, not the first functions.
        order = list(self.mutants)
        random.Random(0).shuffle(order)
        for i, mutant in enumerate(order, 1):
            if mutant.status == "killed":  # by an earlier run (--recheck)
                continue
            qualified = f"{PACKAGE}.{mutant.module}.{mutant.function}"
            tests = sorted((it for it in items if qualified in hits[it.nodeid]), key=lambda it: duration[it.nodeid])
            if not tests:
                mutant.status = "no tests"
                continue
            set_mutant_under_test(mutant.name)
            mutant.status, started = "survived", time.perf_counter()
            for item in tests:
                passed, _ = _run_item(item, max(20.0, self.timeout_factor * duration[item.nodeid]))
                if not passed:
                    mutant.status, mutant.killed_by = "killed", item.nodeid
                    break
            set_mutant_under_test("")
            detail = f"{mutant.module}.{_plain(mutant.function)}: {mutant.old} → {mutant.new}"
            _log_verdict(session, mutant.name, mutant.status == "killed", detail, time.perf_counter() - started)
            if i % 25 == 0:
                print(f"  {i}/{len(self.mutants)} mutants, {time.perf_counter() - t0:.0f} s", flush=True)
                _save(self.mutants, self.results_path)
        return True


def _take_kills(mutants: list[Mutant], earlier: Path) -> None:
    """Mark as killed every mutant that an earlier ``--results`` file records as killed (same change)."""
    killed = {}
    for d in json.loads(earlier.read_text()):
        if d["status"] == "killed":
            m = Mutant(**d)
            killed[m.key] = m.killed_by
    for m in mutants:
        if m.key in killed:
            m.status, m.killed_by = "killed", f"{killed[m.key]} (earlier run)"
    print(f"{sum(m.status == 'killed' for m in mutants)} mutants killed in {earlier}; judging the others", flush=True)


def full_run(modules: list[str], workdir: Path | None, results_path: Path | None, recheck: Path | None = None) -> int:
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fastai_tricks_mutation_")) if owned else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        mutants = _generate(workdir, modules)
        if recheck is not None:
            _take_kills(mutants, recheck)
        _register_mutation_profile()
        sys.path.insert(0, str(workdir / "mutants"))
        os.chdir(workdir)
        from mutmut.configuration import config

        config()  # resolves mutants/ paths from this directory
        os.chdir(workdir / "mutants")
        tests = sorted({t for m in modules for t in SCOPE[m]["tests"]})
        runner = _MutantRunner(mutants, results_path)
        _pytest_main(tests, runner, workdir / "mutants")
        if runner.clean_failures:
            print("left out, as they fail on the unmutated copy:", *runner.clean_failures, sep="\n  ")
    finally:
        os.chdir(ROOT)
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    return _report(mutants, modules, time.perf_counter() - start, results_path)


def _report(mutants: list[Mutant], modules: list[str], seconds: float, results_path: Path | None) -> int:
    equivalents = _read_equivalents()
    for m in mutants:
        if m.status != "killed" and m.key in equivalents:
            m.status = "equivalent"
    print("\n| Module | Mutants | Killed | Equivalent | Survived | No test | Score |\n|---|---|---|---|---|---|---|")
    worst = 1.0
    for module in modules:
        ms = [m for m in mutants if m.module == module]
        count = {s: sum(m.status == s for m in ms) for s in ("killed", "equivalent", "survived", "no tests")}
        judged = len(ms) - count["equivalent"]
        score = count["killed"] / judged if judged else 1.0
        worst = min(worst, score)
        print(
            f"| `{module}` | {len(ms)} | {count['killed']} | {count['equivalent']} | {count['survived']} "
            f"| {count['no tests']} | {100 * score:.1f} % |"
        )
    print(f"\n{len(mutants)} mutants in {seconds / 60:.1f} min")
    left = [m for m in mutants if m.status in ("survived", "no tests")]
    if left:
        print("\nNot killed (add a test, or list in tests/mutation-equivalent.md with the reason):")
        for m in left:
            print(f"- `{m.module}.{_plain(m.function)}`: `{m.old}` → `{m.new}`: {m.status.upper()}")
    _save(mutants, results_path)
    return 0 if worst >= TARGET else 1


def _save(mutants: list[Mutant], results_path: Path | None) -> None:
    if results_path is not None:
        results_path.write_text(json.dumps([m.__dict__ for m in mutants], indent=1, ensure_ascii=False))


def report_only(results_path: Path) -> int:
    """Print the table of a (possibly partial) results file; mutants not run yet are left out."""
    mutants = [Mutant(**d) for d in json.loads(results_path.read_text())]
    done = [m for m in mutants if m.status != "not run"]
    print(f"{len(done)} of {len(mutants)} mutants judged")
    return _report(done, sorted({m.module for m in done}, key=list(SCOPE).index), 0.0, None)


# --- the CI sample of hand-written mutations -----------------------------------------------------------


@dataclass
class _SampleRunner:
    """pytest plugin: apply each patch, run its tests until one fails, put the function back."""

    patches: tuple[Patch, ...]
    survived: list[Patch] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    def pytest_runtestloop(self, session):
        import importlib

        items = list(session.items)
        for patch in self.patches:
            module = importlib.import_module(f"{PACKAGE}.{patch.module}")
            func = getattr(module, patch.function)
            source = textwrap.dedent(inspect.getsource(func))
            if source.count(patch.old) != 1:
                self.broken.append(f"{patch.module}.{patch.function}: {patch.old!r} found {source.count(patch.old)}x")
                _log_verdict(session, f"{patch.module}.{patch.function}", False, "the patch no longer applies", 0.0)
                continue
            namespace: dict = {}
            code = compile(source.replace(patch.old, patch.new), inspect.getfile(func), "exec", flags=_ANNOTATIONS)
            exec(code, module.__dict__, namespace)
            original_code = func.__code__
            tests = [it for it in items if any(it.nodeid.startswith(t) for t in patch.tests)]
            if not tests:
                self.broken.append(f"{patch.module}.{patch.function}: no test matches {patch.tests}")
                _log_verdict(session, f"{patch.module}.{patch.function}", False, "no test matches", 0.0)
                continue
            start, killer = time.perf_counter(), None
            func.__code__ = namespace[patch.function].__code__
            try:
                for item in tests:
                    passed, _ = _run_item(item, 120)
                    if not passed:
                        killer = item.nodeid
                        break
            finally:
                func.__code__ = original_code
            _log_verdict(session, f"{patch.module}.{patch.function}", killer is not None, patch.why, 0.0)
            verdict = f"killed by {killer}" if killer else "SURVIVED"
            print(f"{patch.module}.{patch.function} ({patch.why}): {verdict} [{time.perf_counter() - start:.1f} s]")
            if killer is None:
                self.survived.append(patch)
        return True


def sample_run() -> int:
    start = time.perf_counter()
    _register_mutation_profile()
    os.chdir(ROOT)
    files = sorted({t.split("::")[0] for p in SAMPLE for t in p.tests})
    runner = _SampleRunner(SAMPLE)
    _pytest_main(files, runner, ROOT)
    for line in runner.broken:
        print(f"sample patch no longer applies: {line}")
    failed = len(runner.survived) + len(runner.broken)
    print(f"in {time.perf_counter() - start:.0f} s, each line a hand-written mutant that the tests must kill:")
    print(f"mutants: {len(SAMPLE) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate, among {', '.join(SCOPE)} (default: all)")
    parser.add_argument("--sample", action="store_true", help="run the fixed CI sample of hand-written mutations")
    parser.add_argument("--workdir", type=Path, help="keep the mutated copy here instead of a temporary folder")
    parser.add_argument("--results", type=Path, help="write every mutant's verdict to this JSON file")
    parser.add_argument("--report", type=Path, help="only print the table of an earlier --results file")
    parser.add_argument(
        "--recheck",
        type=Path,
        metavar="FILE",
        help="judge only the mutants not killed in this earlier --results file (after adding tests); "
        "a full run without it gives the score to publish",
    )
    args = parser.parse_args(argv)
    if args.report:
        return report_only(args.report)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    unknown = set(args.modules) - set(SCOPE)
    if unknown:
        parser.error(f"unknown modules {sorted(unknown)}; choose among {list(SCOPE)}")
    if args.sample:
        return sample_run()
    return full_run(args.modules or list(SCOPE), args.workdir, args.results, args.recheck)


if __name__ == "__main__":
    sys.exit(main())
