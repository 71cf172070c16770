r"""Count likelihoods (NB, ZINB, Poisson) and Normal KL, stable in float32.

Everything is written in log space from the decoder's ``log_mu`` and the
dispersion's ``log_theta``, so no ``log(mu + eps)`` is needed and a mean that
underflows to 0 still has finite gradients.

For a negative binomial with mean :math:`\mu` and inverse dispersion
:math:`\theta`,

.. math::
    \log NB(x) = \underbrace{-\theta\,\mathrm{softplus}(\log\mu-\log\theta)}_{A}
      \underbrace{-\,x\,\mathrm{softplus}(\log\theta-\log\mu)}_{B}
      + \underbrace{\log\Gamma(x+\theta)-\log\Gamma(\theta)}_{D(\theta, x)}
      - \log\Gamma(x+1).

``A`` and ``B`` are cheap and computed densely. ``D`` is the expensive part and
is zero when ``x = 0``, so it is evaluated on the non-zero entries only when
they are given (``nz``). ``log Gamma(x+1)`` does not depend on the parameters;
it is precomputed per cell on the host and never enters the gradient.

ZINB with gate logits :math:`\pi` (probability of an extra zero
:math:`\sigma(\pi)`):

.. math::
    \log p(0) = \mathrm{softplus}(A-\pi) - \mathrm{softplus}(-\pi), \qquad
    \log p(x>0) = -\mathrm{softplus}(\pi) + \log NB(x).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

# D(theta, x) switches to a Stirling expansion above this theta: there
# lgamma(x + theta) - lgamma(theta) cancels catastrophically in float32.
_STIRLING_FROM = 10.0


class NonZeros(NamedTuple):
    """The non-zero entries of a (B, G) count matrix as padded COO.

    Padding entries have ``val == 0`` and contribute exactly zero.
    """

    row: jax.Array  # (K,) int32 in [0, B)
    col: jax.Array  # (K,) int32 in [0, G)
    val: jax.Array  # (K,) float32


def _stirling_tail(z):
    # lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2], asymptotic series
    zi = 1.0 / z
    zi2 = zi * zi
    return zi * (1.0 / 12.0 - zi2 * (1.0 / 360.0 - zi2 * (1.0 / 1260.0)))


def lgamma_ratio(theta, x):
    r"""D(theta, x) = lgamma(x + theta) - lgamma(theta), accurate for any theta > 0.

    For large theta uses
    :math:`(\theta-\tfrac12)\log1p(x/\theta) + x(\log(\theta+x)-1) + c(\theta+x) - c(\theta)`
    so that theta = 1e8 with small x keeps full relative precision. Terms that
    depend on theta alone are computed at theta's own shape (per gene when
    theta is per gene), not at the broadcast (cells, genes) shape.
    """
    big = theta >= _STIRLING_FROM
    t_big = jnp.where(big, theta, _STIRLING_FROM)
    t_small = jnp.where(big, 1.0, theta)
    const = jnp.where(big, _stirling_tail(t_big), gammaln(t_small))  # theta's shape
    stirling = ((t_big - 0.5) * jnp.log1p(x / t_big) + x * (jnp.log(t_big + x) - 1.0)
                + _stirling_tail(t_big + x))
    direct = gammaln(x + t_small)
    # exactly 0 at x = 0 (padding entries of the sparse path)
    return jnp.where(x > 0, jnp.where(big, stirling, direct) - const, 0.0)


def _gather(a, nz: NonZeros):
    """Value of a (G,) or (B, G) array at each non-zero entry."""
    if a.ndim == 1:
        return a[nz.col]
    return a[nz.row, nz.col]


def _row_sum(v, nz: NonZeros, n_rows: int):
    return jax.ops.segment_sum(v, nz.row, num_segments=n_rows)


def _lgamma_part(x, log_theta, nz: NonZeros | None):
    """Per-cell sum of D(theta, x)."""
    if nz is None:
        shape = jnp.broadcast_shapes(x.shape, jnp.shape(log_theta))
        return lgamma_ratio(jnp.exp(log_theta), jnp.broadcast_to(x, shape)).sum(-1)
    theta = jnp.exp(_gather(log_theta, nz))
    return _row_sum(lgamma_ratio(theta, nz.val), nz, x.shape[0])


@jax.custom_jvp
def softplus_pair(a):
    """(softplus(a), softplus(-a)) from one exp and one log1p, with exact gradients.

    Both share log1p(exp(-|a|)); neither is formed as the other minus a, which
    cancels in float32 when |a| is large.
    """
    l = jnp.log1p(jnp.exp(-jnp.abs(a)))
    return jnp.maximum(a, 0.0) + l, jnp.maximum(-a, 0.0) + l


@softplus_pair.defjvp
def _softplus_pair_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    e = jnp.exp(-jnp.abs(a))
    l = jnp.log1p(e)
    r = 1.0 / (1.0 + e)  # sigmoid(|a|); sigmoid(-|a|) = e * r
    pos = a >= 0
    sig_a = jnp.where(pos, r, e * r)
    sig_neg = jnp.where(pos, e * r, r)
    return ((jnp.maximum(a, 0.0) + l, jnp.maximum(-a, 0.0) + l),
            (sig_a * da, -sig_neg * da))


def nb_dense_terms(x, log_mu, log_theta):
    """A + B of the NB log-pmf, elementwise (B, G)."""
    a = log_mu - log_theta
    sp_a, sp_neg = softplus_pair(a)
    theta = jnp.exp(log_theta)
    return -theta * sp_a - x * sp_neg, -theta * sp_a


def log_nb(x, log_mu, log_theta, *, nz: NonZeros | None = None, lgamma_const=None):
    """Per-cell NB log-likelihood, summed over genes. x: (B, G)."""
    ab, _ = nb_dense_terms(x, log_mu, log_theta)
    out = ab.sum(-1) + _lgamma_part(x, log_theta, nz)
    return out - _const(x, lgamma_const)


def log_zinb(x, log_mu, log_theta, zi_logits, *, nz: NonZeros | None = None,
             lgamma_const=None):
    """Per-cell ZINB log-likelihood, summed over genes. x: (B, G)."""
    ab, a_term = nb_dense_terms(x, log_mu, log_theta)
    sp_pi = jax.nn.softplus(zi_logits)
    # softplus(-pi) = softplus(pi) - pi
    case_zero = jax.nn.softplus(a_term - zi_logits) - sp_pi + zi_logits
    case_nonzero = ab - sp_pi
    dense = jnp.where(x > 0, case_nonzero, case_zero).sum(-1)
    return dense + _lgamma_part(x, log_theta, nz) - _const(x, lgamma_const)


def log_poisson(x, log_mu, *, lgamma_const=None):
    """Per-cell Poisson log-likelihood, summed over genes."""
    return (x * log_mu - jnp.exp(log_mu)).sum(-1) - _const(x, lgamma_const)


def _const(x, lgamma_const):
    # sum_g lgamma(x + 1): data only, kept out of the gradient.
    if lgamma_const is None:
        # float32 gammaln(1) is 4.8e-7, not 0: skip the zeros
        lgamma_const = jnp.where(x > 0, gammaln(x + 1.0), 0.0).sum(-1)
    return jax.lax.stop_gradient(lgamma_const)


def normal_log_prob(x, mean, var):
    """Elementwise log N(x; mean, var)."""
    return -0.5 * (jnp.log(2.0 * jnp.pi) + jnp.log(var) + (x - mean) ** 2 / var)


def kl_normal(m1, v1, m2, v2):
    """Elementwise KL(N(m1, v1) || N(m2, v2)) with variances v."""
    return 0.5 * (jnp.log(v2) - jnp.log(v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def kl_standard_normal(m, v):
    """Elementwise KL(N(m, v) || N(0, 1))."""
    return 0.5 * (v + m * m - 1.0 - jnp.log(v))
