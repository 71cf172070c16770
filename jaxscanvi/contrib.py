r"""Worked examples of extra loss terms for ``train(loss_terms=...)``.

Each factory returns ``fn(outputs, batch, params) -> scalar``, a pure JAX
function traced into the same jitted training step as the ELBO:

>>> from jaxscanvi import contrib
>>> model.train(loss_terms={"mmd": contrib.mmd_batch_penalty(model.registry.n_batch)},
...             loss_weights={"mmd": 10.0})                   # doctest: +SKIP

``outputs`` is the module's forward pass over the minibatch (``qz_m``,
``qz_v``, ``z``, ``library``, ``log_mu``, ``log_theta``, ``zi_logits``, and
``logits_z`` for scANVI); ``batch`` is the `Batch` (``batch.batch`` batch
codes, ``batch.labels`` label codes, ``batch.weight`` 0 on padding rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .errors import InputError

DEFAULT_SCALES = (0.1, 0.5, 1.0, 2.0, 5.0)


def _check_count(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(name, n, "must be a positive integer", f"pass model.registry.{name}")


def _check_on(on: str) -> None:
    if on not in ("qz_m", "z"):
        raise InputError(
            "on", on, "not 'qz_m' or 'z'", "pass on='qz_m' (posterior means) or on='z' (samples)"
        )


def gaussian_kernel(a, b, scales: Sequence[float] = DEFAULT_SCALES):
    r"""Sum of Gaussian kernels :math:`\sum_s \exp(-\|a_i - b_j\|^2 / (2 s^2))`, (n, m)."""
    d2 = jnp.maximum((a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * a @ b.T, 0.0)
    return sum(jnp.exp(-d2 / (2.0 * s * s)) for s in scales)


def weighted_mmd2(z, w_p, w_q, scales: Sequence[float] = DEFAULT_SCALES):
    r"""Squared MMD between two weighted samples of the rows of ``z``.

    .. math::
        \mathrm{MMD}^2(P, Q) = p^\top K p + q^\top K q - 2\,p^\top K q

    with :math:`p = w_P / \sum w_P`, :math:`q = w_Q / \sum w_Q` and
    :math:`K` the kernel of `gaussian_kernel` (the biased V-statistic of
    Gretton et al. 2012). Zero when either sample is empty.
    """
    K = gaussian_kernel(z, z, scales)
    n_p, n_q = w_p.sum(), w_q.sum()
    p = w_p / jnp.maximum(n_p, 1e-12)
    q = w_q / jnp.maximum(n_q, 1e-12)
    Kp, Kq = K @ p, K @ q
    mmd2 = p @ Kp + q @ Kq - 2.0 * p @ Kq
    return jnp.where((n_p > 0) & (n_q > 0), jnp.maximum(mmd2, 0.0), 0.0)


def mmd_batch_penalty(n_batch: int, scales: Sequence[float] = DEFAULT_SCALES, on: str = "qz_m"):
    r"""MMD between each batch and the rest of the minibatch, on the latent.

    .. math::
        \text{penalty} = \frac{1}{|\mathcal{B}|} \sum_{b \in \mathcal{B}}
            \mathrm{MMD}^2\big(\{z_n : s_n = b\},\ \{z_n : s_n \neq b\}\big)

    over the batches :math:`\mathcal{B}` that have cells on both sides in
    this minibatch (trVAE, Lotfollahi et al. 2020, penalises one pair of
    conditions; one-vs-rest extends it to many batches at one kernel matrix
    per minibatch). ``on="qz_m"`` uses posterior means, ``"z"`` samples.
    """
    _check_count("n_batch", n_batch)
    _check_on(on)
    scales = tuple(float(s) for s in scales)

    def penalty(outputs, batch, params):
        z = outputs[on]
        w = batch.weight
        onehot = jax.nn.one_hot(batch.batch, n_batch, dtype=z.dtype) * w[:, None]

        def one(col):
            rest = w - col
            both = (col.sum() > 0) & (rest.sum() > 0)
            return weighted_mmd2(z, col, rest, scales), both

        vals, present = jax.vmap(one, in_axes=1)(onehot)
        n = present.sum()
        return jnp.where(n > 0, (vals * present).sum() / jnp.maximum(n, 1), 0.0)

    return penalty


def class_centre_loss(n_labels: int, on: str = "qz_m"):
    r"""Centre loss (Wen et al. 2016) on labelled cells: mean squared distance
    of each labelled cell's latent to its type's centre in the minibatch.

    .. math::
        \text{loss} = \frac{1}{N_L} \sum_{n \in L} \|z_n - c_{y_n}\|^2,
        \qquad c_k = \frac{1}{|\{n \in L: y_n = k\}|} \sum_{n \in L: y_n = k} z_n

    where :math:`L` are the minibatch's cells with a label code below
    ``n_labels`` (scANVI's unlabelled code is ``n_labels``). It pulls cells of
    one type together; the KL term keeps the latent from collapsing.
    """
    _check_count("n_labels", n_labels)
    _check_on(on)

    def loss(outputs, batch, params):
        z = outputs[on]
        w = batch.weight * (batch.labels < n_labels)
        onehot = jax.nn.one_hot(batch.labels, n_labels, dtype=z.dtype) * w[:, None]
        counts = onehot.sum(0)
        centres = (onehot.T @ z) / jnp.maximum(counts, 1.0)[:, None]
        own = onehot @ centres  # each labelled cell's centre (zeros elsewhere)
        d2 = jnp.square(z - own).sum(-1)
        return (d2 * w).sum() / jnp.maximum(w.sum(), 1.0)

    return loss
