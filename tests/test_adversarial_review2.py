"""Adversarial review 2: ScorerCollection, RowStats and the scorers' fast paths.

Every score is checked against a plain float64 loop over the presentations, one example at a time
(``Reference`` below), and a collection against the same scorers updated one by one (bit for bit).
Attacks: duplicate indices, NaN/inf rows under ``nonfinite="skip"``, ties at the maximum, every
float dtype, views and non-contiguous tensors, index/logit/target buffers refilled in place
(through ``.numpy()`` too) between updates, inference-mode tensors, empty batches, one class,
``state_dict`` round trips, ``reset``/``new_run`` between updates, custom scorers, huge logits.

Claims that held are plain tests; the failures it found are fixed, each test saying what was
wrong before. (Per-presentation values are float32 by design, documented in ``AUM`` and
``scorers.stats``: a margin or loss beyond float32's range is ``±inf``.)
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

import sampleweights as sw
from conftest import all_logit_scorers
from sampleweights.scorers.base import RunningMeanScorer
from sampleweights.scorers.rowstats import RowStats

# -- the reference: plain float64 loops, one presentation at a time ------------------------------


def row_stats(row: np.ndarray, y: int) -> dict[str, float]:
    """Every per-presentation value of one row, float64, the textbook way."""
    m = row.max()
    e = np.exp(row - m)
    total = e.sum()
    p = e / total
    others = [j for j in range(len(row)) if j != y]
    onehot = np.zeros_like(p)
    onehot[y] = 1.0
    out = {
        "p_y": p[y],
        "loss": math.log(total) - (row[y] - m),
        "entropy": float(-sum(q * math.log(q) for q in p if q > 0)),
        "el2n": float(np.sqrt(((p - onehot) ** 2).sum())),
        "correct": int(np.argmax(row)) == y,  # the first maximum, as torch.argmax
    }
    if others:
        out["margin"] = row[y] - max(row[j] for j in others)
        out["prob_margin"] = p[y] - max(p[j] for j in others)
    return out


class Reference:
    """Per-example presentation lists (per run), then every score as the papers define it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.runs: list[dict[int, list[dict[str, float]]]] = [{}]

    def new_run(self) -> None:
        if any(self.runs[-1].values()):
            self.runs.append({})

    def update(self, indices, logits: torch.Tensor, targets, finite_only: bool = True) -> None:
        rows = logits.detach().double().cpu().numpy()
        for i, row, y in zip(list(indices), rows, list(targets), strict=True):
            if finite_only and not np.isfinite(row).all():
                continue  # nonfinite="skip": the presentation does not count
            self.runs[-1].setdefault(int(i), []).append(row_stats(row, int(y)))

    def all(self, i: int) -> list[dict[str, float]]:
        return [v for run in self.runs for v in run.get(i, [])]

    def mean(self, key: str) -> np.ndarray:
        out = np.full(self.n, np.nan)
        for i in range(self.n):
            vals = [v[key] for v in self.all(i)]
            if vals:
                out[i] = np.mean(vals)
        return out

    def ema(self, key: str, beta: float) -> np.ndarray:
        out = np.full(self.n, np.nan)
        for i in range(self.n):
            vals = [v[key] for v in self.all(i)]
            if vals:
                w = [beta ** (len(vals) - 1 - k) for k in range(len(vals))]
                out[i] = sum(a * b for a, b in zip(w, vals, strict=True)) / sum(w)
        return out

    def datamaps(self) -> dict[str, np.ndarray]:
        conf, var, corr = (np.full(self.n, np.nan) for _ in range(3))
        for i in range(self.n):
            p = [v["p_y"] for v in self.all(i)]
            if p:
                conf[i], var[i] = np.mean(p), np.std(p)  # population std (ddof=0)
                corr[i] = np.mean([v["correct"] for v in self.all(i)])
        return {"confidence": conf, "variability": var, "correctness": corr}

    def forgetting(self) -> np.ndarray:
        """One run: correct→wrong transitions in presentation order; never learned = +inf.
        Several runs: Data Diet's mean over the runs that presented the example."""
        out = np.full(self.n, np.nan)
        for i in range(self.n):
            per_run = []
            for run in self.runs:
                seq = [v["correct"] for v in run.get(i, [])]
                if not seq:
                    continue
                events = sum(1 for a, b in itertools.pairwise(seq) if a and not b)
                per_run.append(events if any(seq) else math.inf)
            if per_run:
                out[i] = np.mean(per_run)
        return out

    def misclassified(self) -> np.ndarray:
        out = np.full(self.n, np.nan)
        run = self.runs[-1] if any(self.runs[-1].values()) else self.runs[-2]
        for i, pres in run.items():
            if pres:
                out[i] = 0.0 if pres[-1]["correct"] else 1.0
        return out


def scorers(n: int, **kw) -> list[sw.Scorer]:
    """One of every logit scorer, each with its plain running mean."""
    return all_logit_scorers(n, confidence_ema=None, **kw)


def ema_scorers(n: int, beta: float, **kw) -> list[sw.Scorer]:
    """EMA twins, renamed so they fit in one collection with the plain ones."""
    out = []
    for kind in (sw.EL2N, sw.AUM, sw.Loss, sw.Margin, sw.Entropy, sw.Confidence):
        s = kind(n, ema=beta, **kw) if kind is not sw.EL2N else _ema_el2n(n, beta, **kw)
        s.name = f"{s.name}_ema"
        out.append(s)
    return out


def _ema_el2n(n: int, beta: float, **kw) -> sw.Scorer:
    return sw.EL2N(n, ema=beta, **kw)


REF_KEY = {
    "el2n": "el2n",
    "aum": "margin",
    "loss": "loss",
    "margin": "prob_margin",
    "entropy": "entropy",
    "confidence": "p_y",
}


def check_against_reference(scores: dict[str, torch.Tensor], ref: Reference, beta=None) -> None:
    for name, got in scores.items():
        base = name.removesuffix("_ema")
        got = got.double().numpy()
        if base in REF_KEY:
            want = (
                ref.ema(REF_KEY[base], beta) if name.endswith("_ema") else ref.mean(REF_KEY[base])
            )
            np.testing.assert_allclose(got, want, rtol=3e-5, atol=2e-6, err_msg=name)
        elif name == "datamaps":
            np.testing.assert_allclose(got, ref.datamaps()["confidence"], rtol=3e-5, atol=2e-6)
        elif name == "forgetting":
            np.testing.assert_array_equal(got, ref.forgetting().astype(np.float32))
        elif name == "misclassified":
            np.testing.assert_array_equal(got, ref.misclassified())


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(width), b.view(width))


def batches(seed: int, n: int, steps: int, batch: int, classes: int, dtype=torch.float32):
    """Random batches with duplicates, ties at the maximum, NaN / ±inf rows, confident rows."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        idx[1] = idx[0]  # a duplicate, always
        idx[4] = idx[3] = idx[2]  # a triple
        logits = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 3
        y = torch.randint(0, classes, (batch,), generator=gen)
        logits[5] = 1.0  # all equal: a tie everywhere
        logits[6, y[6]] = logits[6].max() + 40.0  # confident
        top = logits[7].max()
        logits[7, (y[7] + 1) % classes] = top + 1  # a tie for the max, target not first ...
        logits[7, y[7]] = top + 1
        if step % 2:
            logits[8, 0] = math.nan
            logits[9, 1] = math.inf
        out.append((idx, logits.to(dtype), y))
    return out


# -- claims that hold: a collection is the scorers one by one, and both are the reference --------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_collection_equals_separate_and_reference_with_duplicates_ties_and_skip(dtype):
    n = 13
    together = sw.ScorerCollection(
        *scorers(n, nonfinite="skip"), *ema_scorers(n, 0.7, nonfinite="skip")
    )
    alone = [*scorers(n, nonfinite="skip"), *ema_scorers(n, 0.7, nonfinite="skip")]
    ref = Reference(n)
    for idx, logits, y in batches(0, n, steps=7, batch=12, classes=5, dtype=dtype):
        together.update_indexed(idx, logits, y)
        for s in alone:
            s.update_indexed(idx, logits, y)
        ref.update(idx, logits, y)
    got = together.compute()
    for s in alone:
        assert bitwise(got[s.name], s.compute()), s.name
    ema = {k: v for k, v in got.items() if k.endswith("_ema")}
    plain = {k: v for k, v in got.items() if not k.endswith("_ema")}
    check_against_reference(plain, ref)
    check_against_reference(ema, ref, beta=0.7)
    maps = together["datamaps"].compute_all()
    for key, want in ref.datamaps().items():
        np.testing.assert_allclose(maps[key].double().numpy(), want, rtol=3e-5, atol=2e-6)


def test_views_and_non_contiguous_tensors_everywhere():
    """Logits transposed (column-major), a strided slice, an expanded (stride-0) row; indices a
    strided view of a bigger buffer; int32 and uint8 targets: the reference values."""
    n, c = 9, 6
    gen = torch.Generator().manual_seed(1)
    together = sw.ScorerCollection(*scorers(n))
    ref = Reference(n)
    big = torch.randn(c, 20, generator=gen)
    wide = torch.randn(5, 2 * c, generator=gen)
    layouts = [
        (
            torch.arange(0, 40, 4)[:5] % n,
            big.T[:5],
            torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32),
        ),
        (
            torch.tensor([8, 0, 7, 3, 3, 6, 5])[::2],
            wide[:4, ::2],
            torch.tensor([5, 5, 0, 1], dtype=torch.uint8),
        ),
        (
            torch.tensor([1, 2, 1]),
            torch.randn(1, c, generator=gen).expand(3, c),
            torch.tensor([2, 2, 0]),
        ),
    ]
    for idx, logits, y in layouts:
        assert not logits.is_contiguous()
        together.update_indexed(idx, logits, y)
        ref.update(idx, logits, y)
    check_against_reference(together.compute(), ref)


def test_buffers_refilled_in_place_between_updates_are_read_afresh():
    """One index, logits and target buffer each, refilled through ``.numpy()`` (no version bump)
    and in place through torch between updates: EMA grouping, the distinct fast path and data
    maps follow each batch, not the previous one."""
    n = 5
    beta = 0.5
    together = sw.ScorerCollection(*scorers(n), *ema_scorers(n, beta))
    ref = Reference(n)
    idx_np = np.zeros(4, dtype=np.int64)
    idx = torch.from_numpy(idx_np)
    logits_np = np.zeros((4, 3), dtype=np.float32)
    logits = torch.from_numpy(logits_np)
    y = torch.zeros(4, dtype=torch.int64)
    gen = np.random.default_rng(2)
    plan = [[0, 1, 2, 3], [4, 4, 4, 0], [0, 1, 2, 3], [1, 1, 2, 2], [3, 2, 1, 0]]
    for k, batch in enumerate(plan):
        if k % 2:
            idx_np[:] = batch  # invisible to the version counter
            logits_np[:] = gen.normal(size=(4, 3)) * 3
        else:
            idx.copy_(torch.tensor(batch))
            logits.copy_(torch.from_numpy(gen.normal(size=(4, 3)).astype(np.float32) * 3))
        y.numpy()[:] = gen.integers(0, 3, 4)
        together.update_indexed(idx, logits, y)
        ref.update(idx.clone(), logits.clone(), y.clone())
    scores = together.compute()
    check_against_reference({k: v for k, v in scores.items() if not k.endswith("_ema")}, ref)
    check_against_reference({k: v for k, v in scores.items() if k.endswith("_ema")}, ref, beta)


def test_inference_mode_tensors_and_update_inside_inference_mode():
    n = 6
    together = sw.ScorerCollection(*scorers(n), *ema_scorers(n, 0.9))
    ref = Reference(n)
    for k, (idx, logits, y) in enumerate(batches(3, n, steps=4, batch=10, classes=4)):
        logits = torch.nan_to_num(logits, nan=0.5, posinf=2.0)
        if k % 2:
            with torch.inference_mode():
                together.update_indexed(idx.clone(), logits.clone(), y.clone())
        else:
            with torch.inference_mode():
                made = (idx.clone(), logits.clone(), y.clone())
            together.update_indexed(*made)
        ref.update(idx, logits, y)
    scores = together.compute()
    check_against_reference({k: v for k, v in scores.items() if not k.endswith("_ema")}, ref)
    check_against_reference({k: v for k, v in scores.items() if k.endswith("_ema")}, ref, 0.9)


def test_empty_batches_mid_run_change_no_score():
    n = 4
    together = sw.ScorerCollection(*scorers(n))
    ref = Reference(n)
    data = batches(4, n, steps=3, batch=10, classes=3)
    for idx, logits, y in data:
        logits = torch.nan_to_num(logits, nan=0.0, posinf=1.0)
        together.update_indexed(idx, logits, y)
        together.update_indexed(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3), [])
        ref.update(idx, logits, y)
    assert together["forgetting"].num_updates == 6
    check_against_reference(together.compute(), ref)


def test_one_class_logits():
    """C = 1: p_y = 1, loss = entropy = EL2N = 0, always correct; AUM and Margin raise a
    clear ValueError and nothing changes."""
    n = 3
    plain = [s for s in scorers(n) if s.name not in ("aum", "margin")]
    together = sw.ScorerCollection(*plain)
    together.update_indexed([0, 1, 0], torch.tensor([[3.0], [-1e30], [0.0]]), [0, 0, 0])
    got = together.compute()
    assert got["el2n"].tolist()[:2] == [0.0, 0.0] and got["loss"].tolist()[:2] == [0.0, 0.0]
    assert got["entropy"].tolist()[:2] == [0.0, 0.0] and got["confidence"].tolist()[:2] == [1, 1]
    assert got["forgetting"].tolist()[:2] == [0.0, 0.0]
    assert got["misclassified"].tolist()[:2] == [0.0, 0.0]
    with_margin = sw.ScorerCollection(*scorers(n))
    before = copy.deepcopy(with_margin.state_dict())
    with pytest.raises(ValueError, match="at least 2 classes"):
        with_margin.update_indexed([0], torch.tensor([[1.0]]), [0])
    after = with_margin.state_dict()
    for name in before["scorers"]:
        assert after["scorers"][name]["num_updates"] == 0
        for k, v in before["scorers"][name]["state"].items():
            assert torch.equal(v.nan_to_num(0), after["scorers"][name]["state"][k].nan_to_num(0))


def test_state_dict_round_trip_reset_and_new_run_between_updates():
    """Save mid-run, load into fresh scorers and go on; new_run() twice in a row; reset() then
    the same updates: the reference every time (forgetting's mean over runs, misclassified's
    latest run)."""
    n = 7
    data = batches(5, n, steps=8, batch=10, classes=4)
    data = [(i, torch.nan_to_num(x, nan=0.0, posinf=2.0), y) for i, x, y in data]

    def run(together, ref, part):
        for k, (idx, logits, y) in enumerate(part):
            if k == 2:
                together.new_run()
                together.new_run()
                ref.new_run()
            together.update_indexed(idx, logits, y)
            ref.update(idx, logits, y)

    first = sw.ScorerCollection(*scorers(n), *ema_scorers(n, 0.6))
    ref = Reference(n)
    run(first, ref, data[:4])
    saved = copy.deepcopy(first.state_dict())
    second = sw.ScorerCollection(*scorers(n), *ema_scorers(n, 0.6))
    second.load_state_dict(saved)
    run(second, ref, data[4:])
    scores = second.compute()
    check_against_reference({k: v for k, v in scores.items() if not k.endswith("_ema")}, ref)
    check_against_reference({k: v for k, v in scores.items() if k.endswith("_ema")}, ref, 0.6)
    second.reset()
    ref = Reference(n)
    run(second, ref, data[:3])
    check_against_reference(
        {k: v for k, v in second.compute().items() if not k.endswith("_ema")}, ref
    )


def test_the_same_scorer_twice_is_a_clear_error():
    s = sw.EL2N(3)
    with pytest.raises(ValueError, match=r"distinct.*\['el2n'\]"):
        sw.ScorerCollection(s, s)


def test_ties_at_the_maximum_correctness_is_the_first_maximum():
    """Exact ties in every dtype and every position: correct iff the target is the first maximum
    (torch.argmax), for forgetting, misclassified and data maps' correctness, in a collection."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        logits = torch.tensor(
            [[2.0, 2.0, 1.0], [2.0, 2.0, 1.0], [1.0, 2.0, 2.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0]],
            dtype=dtype,
        )
        y = torch.tensor([0, 1, 1, 2, 2])
        c = sw.ScorerCollection(sw.Misclassified(5), sw.DataMaps(5), sw.ForgettingTracker(5))
        c.update_indexed(torch.arange(5), logits, y)
        assert c.compute()["misclassified"].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
        assert c["datamaps"].compute_all()["correctness"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_huge_finite_logits_single_presentation():
    """±3e38 (finite fp32): one presentation each; the fp32 score is the float64 value rounded
    (±inf only where the value itself is beyond fp32)."""
    n = 2
    c = sw.ScorerCollection(*scorers(n))
    x = torch.tensor([[3e38, -3e38, 0.0], [-3e38, 3e38, 1.0]])
    c.update_indexed([0, 1], x, [0, 0])
    got = c.compute()
    assert got["aum"].tolist() == [float(torch.tensor(3e38)), -math.inf]  # 3e38; -6e38
    assert got["el2n"][0] == 0 and got["el2n"][1] == pytest.approx(math.sqrt(2))
    assert got["forgetting"].tolist() == [0.0, math.inf]
    assert got["margin"].tolist() == [1.0, -1.0]


def test_custom_scorer_in_a_collection_reads_the_shared_statistics_unchanged():
    """A custom Scorer whose ``_values`` reads the logits (default ``_values_from``), and one
    reading ``stats.entropy`` without being an Entropy subclass (so the collection does not
    order it last): every built-in scorer still gets the bits it gets alone."""

    class MaxLogit(RunningMeanScorer):
        name = "maxlogit"

        def _values(self, logits, targets):
            return logits.float().amax(dim=1)

    class EntropyFirst(RunningMeanScorer):
        name = "entropy_first"

        def _values(self, logits, targets):  # pragma: no cover - _values_from is used
            return RowStats(logits, targets).entropy

        def _values_from(self, stats):
            return stats.entropy

    n = 8
    data = batches(6, n, steps=4, batch=10, classes=5)
    data = [(i, torch.nan_to_num(x, nan=0.0, posinf=2.0), y) for i, x, y in data]
    together = sw.ScorerCollection(MaxLogit(n), EntropyFirst(n), *scorers(n))
    alone = [MaxLogit(n), EntropyFirst(n), *scorers(n)]
    for idx, logits, y in data:
        together.update_indexed(idx, logits, y)
        for s in alone:
            s.update_indexed(idx, logits, y)
    got = together.compute()
    for s in alone:
        assert bitwise(got[s.name], s.compute()), s.name


def test_logits_changed_in_place_after_update_do_not_leak():
    """The caller reuses its logits buffer right after update: nothing is read later."""
    n = 3
    together = sw.ScorerCollection(*scorers(n))
    ref = Reference(n)
    x = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 5.0]])
    for _ in range(2):
        together.update_indexed([0, 1, 2], x, [0, 0, 2])
        ref.update([0, 1, 2], x, [0, 0, 2])
        x.mul_(-1.5)
    check_against_reference(together.compute(), ref)


# -- failures found, now fixed -------------------------------------------------------------------


def _compile_works() -> bool:
    try:
        import torch._dynamo
    except Exception:  # pragma: no cover
        return False
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is unavailable here")
def test_compiled_correctness_of_float64_logits_closer_than_fp32_can_tell():
    """Before: compile=True: float64 logits [0, 1e-300] with target 0 are misclassified (argmax 1),
    but the fused pass counts them correct: x_y - max rounds to fp32 -0.0, so t_y == t_other
    reads as 'the target ties for the max' and no earlier column is the max (rowstats._fused:
    correct = ... | (t_y == t_other) & ~earlier_top). Eager says wrong."""
    x = torch.tensor([[0.0, 1e-300], [0.0, 1e-46]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    compiled = sw.ScorerCollection(sw.Misclassified(2), sw.ForgettingTracker(2), compile=True)
    eager = sw.ScorerCollection(sw.Misclassified(2), sw.ForgettingTracker(2))
    compiled.update_indexed([0, 1], x, y)
    eager.update_indexed([0, 1], x, y)
    assert compiled._fused is not None
    assert eager.compute()["misclassified"].tolist() == [1.0, 1.0]  # the reference: argmax 1
    assert compiled.compute()["misclassified"].tolist() == [1.0, 1.0]


def test_min_token_accuracy_exact_fraction_counts_as_correct():
    """Before: Sequences, min_token_accuracy=0.3: 15 of 50 valid tokens right is exactly 30% (15/50
    >= 0.3 in Python), but token_correct compares hits >= 0.3 * count in float32 (0.3f * 50 =
    15.000001): the sequence counts as wrong (misclassified 1.0, data maps correctness 0). Also
    0.6 (30/50), 0.15 (15/100), 0.72, ..."""
    t, c = 50, 3
    logits = torch.zeros(1, t, c)
    targets = torch.zeros(1, t, dtype=torch.int64)
    logits[0, :15, 0] = 5.0  # 15 tokens right (target 0)
    logits[0, 15:, 1] = 5.0  # 35 wrong
    c_ = sw.ScorerCollection(
        sw.Misclassified(1, min_token_accuracy=0.3), sw.DataMaps(1, min_token_accuracy=0.3)
    )
    c_.update_indexed([0], logits, targets)
    assert c_.compute()["misclassified"].tolist() == [0.0]


def test_min_token_accuracy_is_pythons_fraction_for_every_count_and_threshold():
    """Exhaustive over 1..60 valid tokens, every hit count and 30 thresholds: a sequence is
    correct exactly when Python's ``hits / count >= min_token_accuracy``."""
    from sampleweights.scorers.base import token_correct

    rows = [(h, n) for n in range(1, 61) for h in range(n + 1)]
    hits = torch.tensor([[k < h for k in range(60)] for h, _ in rows])
    valid = torch.tensor([[k < n for k in range(60)] for _, n in rows])
    for acc in [0.09, 0.15, 0.18, 0.27, 0.3, 0.33, 0.36, 0.5, 0.54, 0.6, 0.66, 0.72, 0.7, 0.9]:
        want = [h / n >= acc for h, n in rows]
        assert token_correct(hits, valid, acc).tolist() == want, acc


@pytest.mark.parametrize("in_collection", [False, True])
def test_empty_batch_without_classes_has_a_clear_error(in_collection):
    """Before: An empty batch built as torch.empty(0, 0) (a rank that has no batch and does not
    know C) passes validation and then fails inside RowStats with IndexError 'amax(): Expected
    reduction dim 1 to have non-zero size.' (rowstats._Pass.__init__): an unclear error;
    expected a ValueError asking for (0, C) logits, or an empty update."""
    s = sw.ScorerCollection(sw.EL2N(3), sw.ForgettingTracker(3)) if in_collection else sw.EL2N(3)
    with pytest.raises(ValueError, match="class"):
        s.update_indexed([], torch.zeros(0, 0), [])


def test_a_custom_scorer_returning_no_values_is_named_in_the_error():
    """Before: A custom scorer whose _values_from returns None in a collection: ValueError 'zip()
    argument 2 is shorter than argument 1' (collection._exchange / the ingest zip, after `ready
    = [v for v in values if v is not None]`), naming neither the scorer nor what is wrong."""

    class NoValues(sw.EL2N):
        name = "no_values"

        def _values_from(self, stats):
            return None

    with pytest.raises((TypeError, ValueError), match=r"no_values|NoValues"):
        sw.ScorerCollection(sw.EL2N(3), NoValues(3)).update_indexed([0], torch.zeros(1, 2), [0])


def test_ema_state_with_another_decay_is_rejected():
    """Before: state_dict() does not record `ema`: the state of Loss(ema=0.9) loads silently into
    Loss(ema=0.1) (same state names), and the resumed average mixes two decays, equal to neither
    definition; a plain-mean state into an EMA scorer is rejected, this is not."""
    from sampleweights.errors import StateMismatchError

    a = sw.Loss(2, ema=0.9)
    a.update_indexed([0], torch.zeros(1, 2), [0])
    with pytest.raises(StateMismatchError):
        sw.Loss(2, ema=0.1).load_state_dict(a.state_dict())


def test_skipped_row_between_duplicates_and_forgetting_across_runs_sum():
    """Index 0 three times in one batch, the middle row NaN (skipped): right → wrong is one
    event; the EMA and data maps see two presentations. across_runs="sum" adds an unlearned
    run's presentations."""
    kw = {"nonfinite": "skip"}
    c = sw.ScorerCollection(
        sw.ForgettingTracker(2, **kw),
        sw.Misclassified(2, **kw),
        sw.DataMaps(2, **kw),
        sw.AUM(2, ema=0.5, **kw),
    )
    x = torch.tensor([[2.0, 0.0], [math.nan, 0.0], [0.0, 2.0], [0.0, 3.0]])
    c.update_indexed([0, 0, 0, 1], x, [0, 0, 0, 0])
    with pytest.warns(RuntimeWarning, match="skipped"):
        got = c.compute()
    assert got["forgetting"].tolist() == [1.0, math.inf]
    assert got["misclassified"].tolist() == [1.0, 1.0]
    assert got["aum"][0].item() == pytest.approx((0.5 * 2.0 - 2.0) / 1.5)
    f = sw.ForgettingTracker(3, across_runs="sum")
    right, wrong = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    for run in (
        [(0, right), (0, wrong), (1, wrong), (1, wrong)],
        [(0, wrong), (1, right), (1, wrong), (2, wrong)],
    ):
        f.new_run()
        for i, x in run:
            f.update_indexed([i], x, [0])
    assert f.compute().tolist() == [2.0, 3.0, math.inf]  # 1 + 1 (unlearned: 1 pres.); 2 + 1
