"""Parity with scvi-tools: train small scvi-tools models, import their weights,
and compare every quantity in evaluation mode.

Both sides are evaluated at the posterior means (scvi-tools' ``rsample`` is
patched to return the mean; jaxscanvi's terms take ``sample=False``), so the
comparison is deterministic. A quantity's difference is

    max |ours - theirs| / max |theirs|     (over all cells and genes)

Run ``python tests/parity.py [--json PATH]`` (needs scvi-tools and torch) to
print the README's parity table; ``tests/test_parity.py`` asserts it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import jax
import numpy as np

TOL = 1e-4

# scvi-tools settings compared: (name, model kwargs, SCANVI on top?)
CASES = {
    "scvi_default": dict(n_latent=5, n_hidden=32),
    "scvi_nb_learned_library": dict(n_latent=4, n_hidden=24, n_layers=2,
                                    gene_likelihood="nb", dispersion="gene-batch",
                                    use_observed_lib_size=False, encode_covariates=True),
    "scvi_poisson_layernorm": dict(n_latent=4, n_hidden=16, gene_likelihood="poisson",
                                   use_batch_norm="none", use_layer_norm="both"),
}


def parity_adata(seed: int = 0):
    """400 cells x 120 genes, 2 batches, a categorical and a continuous covariate,
    4 cell types of which 30% of cells are unlabelled."""
    from jaxscanvi import synthetic_atlas
    a = synthetic_atlas(n_cells=400, n_genes=120, n_batches=2, n_lineages=2,
                        types_per_lineage=2, seed=seed)
    rng = np.random.default_rng(seed)
    a.obs["site"] = rng.choice(["s1", "s2", "s3"], a.n_obs)
    a.obs["percent_mito"] = rng.normal(0.0, 1.0, a.n_obs)
    lab = a.obs["cell_type"].astype(str).to_numpy().copy()
    lab[rng.random(a.n_obs) < 0.3] = "Unknown"
    a.obs["label"] = lab
    return a


def _quiet():
    import logging
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def train_scvi_tools(folder: Path, epochs: int = 3) -> dict[str, Path]:
    """Train one scvi-tools model per case (and scANVI on the first); save each."""
    import scvi
    _quiet()
    scvi.settings.seed = 0
    out = {}
    for name, kw in CASES.items():
        a = parity_adata()
        scvi.model.SCVI.setup_anndata(a, batch_key="batch", labels_key="label",
                                      categorical_covariate_keys=["site"],
                                      continuous_covariate_keys=["percent_mito"])
        m = scvi.model.SCVI(a, **kw)
        m.train(max_epochs=epochs, batch_size=128, enable_progress_bar=False)
        m.save(folder / name, save_anndata=True, overwrite=True)
        out[name] = folder / name
        if name == "scvi_default":
            s = scvi.model.SCANVI.from_scvi_model(m, unlabeled_category="Unknown")
            s.train(max_epochs=epochs, batch_size=128, enable_progress_bar=False)
            s.save(folder / "scanvi", save_anndata=True, overwrite=True)
            out["scanvi"] = folder / "scanvi"
    return out


@contextlib.contextmanager
def _means_not_samples():
    """scvi-tools samples with Normal.rsample; return the mean instead."""
    import torch
    orig = torch.distributions.Normal.rsample

    def mean(self, sample_shape=torch.Size()):
        return self.loc.expand(self._extended_shape(sample_shape))

    torch.distributions.Normal.rsample = mean
    try:
        yield
    finally:
        torch.distributions.Normal.rsample = orig


def _theirs(model, scanvi: bool) -> dict[str, np.ndarray]:
    import torch
    module = model.module
    module.eval()
    dl = model._make_data_loader(adata=model.adata, batch_size=model.adata.n_obs)
    tensors = next(iter(dl))
    with torch.no_grad(), _means_not_samples():
        inf, gen, loss = module(tensors, loss_kwargs={"kl_weight": 1.0})
    px = gen["px"]
    rec = loss.reconstruction_loss
    rec = sum(v for v in rec.values()) if isinstance(rec, dict) else rec
    kl = loss.kl_local
    out = {"latent_mean": inf["qz"].loc, "latent_var": inf["qz"].scale ** 2,
           "px_scale": px.scale,
           "px_rate": px.mu if hasattr(px, "mu") else px.rate,
           "reconstruction_loss": rec, "kl_local": sum(kl.values())}
    if getattr(px, "theta", None) is not None:
        out["px_theta"] = px.theta
    if getattr(px, "zi_logits", None) is not None:
        out["px_dropout_logits"] = px.zi_logits
    if not scanvi:
        out["kl_z"] = kl["kl_divergence_z"]
        if inf.get("ql") is not None:
            out["kl_l"] = kl["kl_divergence_l"]
    else:
        with torch.no_grad():
            out["classifier_logits"] = module.classify(
                tensors["X"], tensors["batch"],
                cont_covs=tensors.get("extra_continuous_covs"),
                cat_covs=tensors.get("extra_categorical_covs"))
    out["elbo_per_cell"] = out["reconstruction_loss"] + out["kl_local"]
    out["reconstruction_loss_sparse"] = out["reconstruction_loss"]
    n = tensors["X"].shape[0]
    return {k: np.broadcast_to(v.detach().numpy(), (n,) + tuple(v.shape[1:])
                               if v.ndim > 1 else v.shape).astype(np.float64)
            for k, v in out.items()}


def _ours(model, scanvi: bool, want) -> dict[str, np.ndarray]:
    from jaxscanvi import losses
    batch = model.minibatch()
    key = jax.random.PRNGKey(0)
    if scanvi:
        t, o, _ = losses.scanvi_per_cell(model.module, model.params, model.state, batch, key,
                                         objective="scvi-tools", sparse=False, sample=False)
    else:
        t, o, _ = losses.scvi_per_cell(model.module, model.params, model.state, batch, key,
                                       sparse=False, sample=False)
    # the likelihood over the list of non-zeros (the training path on
    # accelerators; the CPU trains on the fused dense pass above) must agree too
    fn = losses.scanvi_per_cell if scanvi else losses.scvi_per_cell
    kw = {"objective": "scvi-tools"} if scanvi else {}
    with mock.patch.object(losses, "sparse_pays", lambda: True):
        t_sparse = fn(model.module, model.params, model.state, batch, key, sparse=True,
                      sample=False, **kw)[0]
    out = {"latent_mean": o["qz_m"], "latent_var": o["qz_v"],
           "reconstruction_loss_sparse": t_sparse["reconstruction_loss"],
           "px_scale": np.exp(o["log_scale"]), "px_rate": np.exp(o["log_mu"]),
           "reconstruction_loss": t["reconstruction_loss"], "kl_local": t["kl_local"],
           "elbo_per_cell": t["elbo"], "kl_z": t["kl_z"], "kl_l": t["kl_l"]}
    if o.get("log_theta") is not None:
        out["px_theta"] = np.exp(np.asarray(o["log_theta"]))
    if o.get("zi_logits") is not None:
        out["px_dropout_logits"] = o["zi_logits"]
    if scanvi:
        out["classifier_logits"] = model.module.apply(
            {"params": model.params, **model.state}, batch, train=False,
            method=type(model.module).classify)
    return {k: np.broadcast_to(np.asarray(out[k], np.float64), want[k].shape)
            for k in want if k in out}


def rel_diff(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def compare(folder: Path, name: str) -> dict:
    """Import one scvi-tools folder and measure every quantity's difference."""
    import scvi
    import jaxscanvi as js
    _quiet()
    scanvi = name == "scanvi"
    theirs_model = (scvi.model.SCANVI if scanvi else scvi.model.SCVI).load(str(folder))
    ours_model = (js.SCANVI if scanvi else js.SCVI).from_scvi_tools(folder)
    theirs = _theirs(theirs_model, scanvi)
    ours = _ours(ours_model, scanvi, theirs)
    diffs = {k: rel_diff(ours[k], theirs[k]) for k in theirs}
    result = {"case": name, "kwargs": CASES.get(name, {"from": "scvi_default"}),
              "max_rel_diff": diffs}
    if scanvi:
        pt = np.asarray(theirs_model.predict()).astype(str)
        pj = np.asarray(ours_model.predict()).astype(str)
        result["predict_agreement"] = float((pt == pj).mean())
        soft_t = np.asarray(theirs_model.predict(soft=True))
        soft_j = np.asarray(ours_model.predict(soft=True))
        result["max_rel_diff"]["predict_soft"] = rel_diff(soft_j, soft_t)
    result["max_rel_diff"]["get_latent_representation"] = rel_diff(
        ours_model.get_latent_representation(), theirs_model.get_latent_representation())
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        folders = train_scvi_tools(Path(d), args.epochs)
        results = [compare(f, n) for n, f in folders.items()]
    import scvi
    import torch
    record = {"scvi_tools": scvi.__version__, "torch": torch.__version__,
              "epochs": args.epochs, "tolerance": TOL, "results": results}
    for r in results:
        print(f"{r['case']}:")
        for k, v in r["max_rel_diff"].items():
            print(f"  {k:28s} {v:.2e}")
        if "predict_agreement" in r:
            print(f"  {'predict() labels equal':28s} {r['predict_agreement']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
