"""FisherTune: selection from cached estimates, sparse training of exactly the mask, the CLI and the grids."""

import json
import subprocess
import sys

import pytest
import torch

from fishertune.backbones import build_backbone
from fishertune.engine.optim import build_optimizer
from fishertune.errors import UserError
from fishertune.fisher import budget_elements
from fishertune.fisher.estimate import FisherEstimate
from fishertune.fisher.method import absolute_eps
from fishertune.heads import build_head
from fishertune.segmentor import Segmentor
from fishertune.tuning import MethodContext, build_method

QUICK = {"images": 4, "estimator": "direct"}  # 4 per-image passes on x and x': a second on this CPU


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny passes (conftest.py)


def _segmentor():
    torch.manual_seed(0)
    return Segmentor(build_backbone("dinov2-tiny", pretrained=False, seed=0), build_head("light", 128, 19, channels=32))


def _context(tmp_path, calls, identity=None):
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 64, 64, generator=gen), torch.randint(0, 19, (2, 64, 64), generator=gen))
               for _ in range(2)]

    def source_batches(n):
        calls.append(n)
        return (batches[i % 2] for i in range(n))

    return MethodContext(device=torch.device("cpu"), seed=0, source_batches=source_batches, source_images=4,
                         cache_dir=tmp_path, identity=identity or {"backbone": "dinov2-tiny", "source": "synthetic"})


def _prepared(tmp_path, calls, **config):
    seg, m = _segmentor(), build_method("fishertune", {**QUICK, **config})
    ctx = _context(tmp_path, calls)
    m.apply(seg, ctx)
    m.before_training(seg, ctx)
    return seg, m


def test_a_step_changes_exactly_the_selected_elements(tmp_path):
    seg, m = _prepared(tmp_path, [])
    mask = m.sparse_indices(seg)
    k = budget_elements(seg.backbone, 0.05)
    assert sum(t.numel() for t in mask.values()) == k == m.trainable_backbone_params(seg)
    before = {n: p.detach().clone() for n, p in seg.named_parameters()}
    opt = build_optimizer(seg, lr=1e-2, weight_decay=0.05, sparse=mask)
    seg.train()
    opt.zero_grad()
    seg.loss(torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))).backward()
    opt.step()
    for name, p in seg.backbone.named_parameters(prefix="backbone"):
        changed = (p.detach() != before[name]).flatten().nonzero().flatten()
        selected = mask.get(name, torch.empty(0, dtype=torch.long))
        # Adam moves every selected element with a non-zero gradient, and weight decay the rest of them
        assert torch.equal(changed, selected), name
    assert all(not torch.equal(p, before[f"head.{n}"]) for n, p in seg.head.named_parameters() if p.ndim > 1)


def test_dr_fim_mask_is_the_top_k_of_the_cached_estimate(tmp_path):
    seg, m = _prepared(tmp_path, [])
    est = FisherEstimate.load(m.paths["estimate"])
    assert est.estimator == "direct" and est.images == 4 and est.fisher_shift is not None
    drf = est.drf(absolute_eps(est, 0.1))
    k = sum(t.numel() for t in m.mask.values())
    scores = torch.cat([drf[n].flatten() for n in drf])
    kept = torch.cat([drf[n].flatten()[m.mask[n]] for n in m.mask if n in drf])
    assert kept.numel() == k and kept.min() >= scores.topk(k).values.min()


def test_estimates_are_computed_once_and_shared_by_the_selectors(tmp_path):
    calls = []
    _, dr = _prepared(tmp_path, calls)
    assert len(calls) == 1
    _, again = _prepared(tmp_path, calls)  # same mask from the cache: no data read
    assert len(calls) == 1 and all(torch.equal(dr.mask[n], again.mask[n]) for n in dr.mask)
    _, fim = _prepared(tmp_path, calls, selector="fim")  # another selector, same estimate
    assert len(calls) == 1 and fim.paths["estimate"] == dr.paths["estimate"]
    assert any(not torch.equal(dr.mask[n], fim.mask[n]) for n in dr.mask)
    _, other = _prepared(tmp_path, calls, images=2)  # another estimate
    assert len(calls) == 2 and other.paths["estimate"] != dr.paths["estimate"]
    info = json.loads((dr.paths["estimate"].parent / "info.json").read_text())
    assert info["settings"]["images"] == 4 and info["identity"]["backbone"] == "dinov2-tiny"
    png = dr.paths["plot"]
    assert png.exists() and png.stat().st_size > 1000
    assert not list(tmp_path.rglob(".*"))  # nothing half-written left behind


def test_random_selectors_need_no_data_and_follow_the_seed(tmp_path):
    calls = []
    _, a = _prepared(tmp_path, calls, selector="random_q", cache=False)
    _, b = _prepared(tmp_path, calls, selector="random_q", cache=False)
    _, c = _prepared(tmp_path, calls, selector="random_q", cache=False, selection_seed=7)
    assert calls == []
    assert all(torch.equal(a.mask[n], b.mask[n]) for n in a.mask)
    assert any(not torch.equal(a.mask[n], c.mask.get(n, torch.empty(0))) for n in a.mask)
    assert all("attn.qkv" in n for n, t in a.mask.items() if t.numel())  # q rows live in the fused projection


def test_an_impossible_budget_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="budget"):
        build_method("fishertune", {"budget": 1.5})
    seg = _segmentor()
    with pytest.raises(UserError, match="budget"):
        build_method("fishertune", {"budget": 1e-9}).apply(seg, _context(tmp_path, []))


def test_fisher_command_estimates_selects_and_plots(tmp_path, mini_manifest, monkeypatch):
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    manifest = mini_manifest("fish", "methods:\n  - freeze\n"
                                     "  - {name: fishertune, label: fim, config: {selector: fim, images: 4, estimator: direct}}\n"
                                     "  - {name: fishertune, label: dr_fim, config: {images: 4, estimator: direct}}\n")
    out = subprocess.run([sys.executable, "-m", "fishertune.cli", "fisher", str(manifest)], capture_output=True,
                         text=True, env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr
    estimates = list((tmp_path / "cache" / "fisher").glob("*/estimate.safetensors"))
    assert len(estimates) == 1  # both rows share one estimate
    assert len(list(estimates[0].parent.glob("selection-*.png"))) == 2
    lines = out.stdout.splitlines()
    assert [ln.split()[0] for ln in lines if not ln.startswith(" ")] == ["fim", "dr_fim"]  # not freeze
    assert sum(ln.split()[0] == "estimate" for ln in lines if ln.startswith(" ")) == 2


def test_ablation_and_estimation_grids_render_beside_the_papers_numbers(tmp_path, mini_manifest, monkeypatch):
    from fishertune.report.tables import RENDERERS
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.run import run_manifest

    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    common = ("source: cityscapes\ntargets: [bdd100k, acdc]\ntrain: {iterations: 4}\n"
              "method_configs: {fishertune: {images: 4, estimator: direct}}\n")
    ablation = mini_manifest("abl", common + "methods:\n  - freeze\n"
                                             "  - {name: fishertune, label: dr_fim, config: {selector: dr_fim}}\n",
                             table="ablation")
    estimation = mini_manifest("est", common + "methods:\n"
                                               "  - {name: fishertune, label: fim-direct, config: {selector: fim}}\n",
                               table="estimation")
    for manifest in (ablation, estimation):
        lm = load_manifest(manifest)
        run_manifest(lm, str(tmp_path / "runs"), progress=False)
        RENDERERS[lm.manifest.table](tmp_path / "runs" / lm.results_name, tmp_path / "tables")
    md = (tmp_path / "tables" / "ablation.md").read_text()
    dr = next(line for line in md.splitlines() if "| dr_fim" in line)
    assert "/ 67.7 (" in dr and "/ 77.5 (" in dr and "/ 72.6 (" in dr  # DINOv2-L's DR-FIM row and its mean
    assert "/ 63.3 (" in next(line for line in md.splitlines() if "| freeze" in line)
    assert "Cityscapes -> BDD100K, ACDC" in md and "miniature" in md
    est = (tmp_path / "tables" / "estimation.md").read_text()
    assert "fim-direct" in est and "/ -" in est  # the paper gives no numbers for this comparison
    assert (tmp_path / "tables" / "ablation.tex").read_text().count(r"\midrule") == 1


def test_growing_schedule_trains_nested_masks_that_reach_the_budget(tmp_path):
    seg, m = _prepared(tmp_path, [], schedule="growing", start_fraction=0.5, growth_end=0.5, growth_stages=2)
    k = budget_elements(seg.backbone, 0.05)
    sizes = [sum(t.numel() for t in s.values()) for s in m.stages]
    assert sizes == [round(k * 0.5), round(k * 0.75), k] and m.trainable_backbone_params(seg) == k
    for small, large in zip(m.stages, m.stages[1:]):  # nested: each stage keeps the previous one
        assert all(torch.isin(small[n], large[n]).all() for n in small)
    opt = build_optimizer(seg, lr=1e-2, weight_decay=0.0, sparse=m.sparse_indices(seg))
    seg.train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    allowed_per_step = []
    for it in range(8):  # stage 1 at iteration 2, stage 2 at iteration 4
        before = {n: p.detach().clone() for n, p in seg.backbone.named_parameters(prefix="backbone")}
        opt.zero_grad()
        seg.loss(x, y).backward()
        grown = m.sparse_growth(seg, it, 8)
        if grown:
            params = dict(seg.named_parameters())
            opt.grow({params[n]: idx for n, idx in grown.items()})
        opt.step()
        changed = sum(int((p.detach() != before[n]).sum()) for n, p in seg.backbone.named_parameters(prefix="backbone"))
        allowed_per_step.append((changed, sum(t.numel() for t in m.mask.values())))
    assert [a for _, a in allowed_per_step] == [sizes[0]] * 2 + [sizes[1]] * 2 + [sizes[2]] * 4
    assert all(c <= a for c, a in allowed_per_step) and allowed_per_step[-1][0] > 0.5 * k
    calls = []
    m = build_method("fishertune", {**QUICK, "schedule": "growing", "selector": "random"})
    with pytest.raises(UserError, match="score selector"):
        m.apply(_segmentor(), _context(tmp_path, calls))
    assert calls == []  # refused before any data is read


def test_a_cells_numbers_do_not_depend_on_whether_its_estimate_was_cached(tmp_path, mini_manifest, monkeypatch):
    """Estimating draws from torch's random stream (Mask2Former's point sampling) and reading the cache
    does not; training must start from the same stream either way."""
    from fishertune.runner.manifest import load_manifest
    from fishertune.runner.run import run_manifest

    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    lm = load_manifest(mini_manifest("cached", "methods: [fishertune]\ntrain: {iterations: 6}\n"
                                               "execution: {log_every: 1}\n"
                                               "method_configs: {fishertune: {images: 4, estimator: direct}}\n"))
    runs = []
    for name in ("fresh", "cached"):
        run_manifest(lm, str(tmp_path / name), progress=False)
        (path,) = (tmp_path / name / lm.results_name).glob("*.json")
        runs.append(json.loads(path.read_text()))
    assert len(list((tmp_path / "cache" / "fisher").glob("*/estimate.safetensors"))) == 1  # the second one read it
    assert runs[0]["train"]["losses"] == runs[1]["train"]["losses"]
    for target in runs[0]["targets"]:
        assert runs[0]["targets"][target]["confusion"] == runs[1]["targets"][target]["confusion"]


def test_a_training_batch_of_one_is_estimated_two_images_at_a_time(tmp_path):
    """DR-FIM's style shift measures channel statistics over a batch, so a training batch of 1 (a 4-GPU DDP run
    of batch 4; the full-size smoke) used to fail the estimate; its batches are now joined to 2 images, which
    gives the estimate of the same images served 2 at a time, and batches already that large pass unchanged."""
    from fishertune.fisher.method import batches_of_at_least

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 64, 64, generator=gen), torch.randint(0, 19, (4, 64, 64), generator=gen)
    singles = [(x[i:i + 1], y[i:i + 1]) for i in range(4)]
    assert [b[0].shape[0] for b in batches_of_at_least(singles, 2)] == [2, 2]
    assert [b[0].shape[0] for b in batches_of_at_least(singles[:3], 2)] == [3]  # a remainder joins the last
    pairs = [(x[:2], y[:2]), (x[2:], y[2:])]
    assert all(a[0] is b[0] for a, b in zip(batches_of_at_least(pairs, 2), pairs))

    def estimate(batches):
        seg, m = _segmentor(), build_method("fishertune", {**QUICK, "cache": False})
        ctx = MethodContext(device=torch.device("cpu"), seed=0, source_batches=lambda n: iter(batches[:n]),
                            source_images=4, cache_dir=tmp_path, identity={})
        m.apply(seg, ctx)
        m.before_training(seg, ctx)
        return m.mask

    one_at_a_time, two_at_a_time = estimate(singles), estimate(pairs)
    assert all(torch.equal(one_at_a_time[n], two_at_a_time[n]) for n in two_at_a_time)
    with pytest.raises(Exception, match="images"):
        build_method("fishertune", {"images": 1})


def test_the_estimate_steps_variants_are_configs_the_method_accepts():
    """benchmarks/mini/estimate_steps.py's variants (the README's evidence on the estimate) become the method
    config they name: steps, Adam's learning rate and the curvature, or the direct estimator."""
    import importlib.util
    from pathlib import Path

    import yaml

    from fishertune.fisher.method import FisherTuneConfig

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mini" / "estimate_steps.py"
    spec = importlib.util.spec_from_file_location("estimate_steps", path)
    steps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(steps)

    def config(variant):
        return FisherTuneConfig(**yaml.safe_load("{" + steps.estimator_config(variant) + "}"))

    c = config("200/sampled")
    assert (c.estimator, c.variational.steps, c.variational.curvature) == ("variational", 200, "sampled")
    c = config("20@0.5/fisher")
    assert (c.variational.steps, c.variational.lr, c.variational.curvature) == (20, 0.5, "fisher")
    assert config("5").variational.curvature == FisherTuneConfig().variational.curvature == "fisher"
    assert config("direct").estimator == "direct"
    assert steps.label("20@0.5/sampled") == "variational 20 steps lr 0.5 sampled"
    with pytest.raises(ValueError):
        config("5/hessian")
