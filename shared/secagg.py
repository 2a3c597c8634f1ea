"""SecAgg+ parameters: checked at start-up, and the quantization error they allow.

Flower's SecAgg+ quantizes each value a site sends, after scaling it by ``n / max_weight``
and clipping it to ``[-clipping_range, clipping_range]``, to an integer in
``[0, quantization_range]``; it adds masks modulo ``modulus`` and the server sums the masked
vectors. Three things must hold for the sum to be the plaintext weighted mean up to rounding:

- no value is clipped by the quantizer: CareFL sites clip their delta to ``delta-bound`` (the
  clipping range) and refuse a round with more than ``max_weight`` training records;
- the sum of the sites' quantized values never wraps around the modulus:
  ``sites * quantization_range < modulus``;
- the modulus is a power of two (Flower's masks and ``mod`` rely on it).

Flower validates some of these only when a round starts, and ``clipping_range <= 0`` not at
all; :meth:`SecAggSettings.check` refuses every invalid value up front, naming the run-config
key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.errors import ConfigError

INT32_LIMIT = 1 << 31  # Flower's stochastic rounding casts quantized values to int32
MAX_MODULUS = 1 << 32  # masks and sums stay far inside int64


@dataclass(frozen=True)
class SecAggSettings:
    """The parameters of SecAgg+ for one run.

    Attributes
    ----------
    clipping_range : float
        Sites' delta bound (``delta-bound``); values lie in ``[-clipping_range, clipping_range]``.
    max_weight : float
        ``secagg-max-weight``: the largest number of training records a site may weigh.
    quantization_range : int
        ``secagg-quantization-range``: integer levels over the clipping interval.
    modulus : int
        ``secagg-modulus``: masked sums are taken modulo this power of two.
    threshold : int
        ``secagg-threshold``: shares needed to reconstruct a secret; 0 = two thirds of the
        sampled sites (at least 2).
    timeout : float
        ``stage-timeout``: seconds the server waits for the sites at each stage.
    """

    clipping_range: float
    max_weight: float
    quantization_range: int
    modulus: int
    threshold: int
    timeout: float

    def check(self, num_sites: int) -> None:
        """Refuse parameters SecAgg+ cannot run with for ``num_sites`` sites.

        The clipping range, max weight and timeout are positive numbers already: ``RunConfig``
        refuses anything else for every run.

        Raises
        ------
        ConfigError
            Naming the run-config key and the value at fault.
        """
        if not 2 <= self.quantization_range < INT32_LIMIT:
            raise ConfigError(
                f"`secagg-quantization-range` must be in [2, 2^31), got {self.quantization_range!r}."
            )
        if self.modulus < 2 or self.modulus & (self.modulus - 1):
            raise ConfigError(f"`secagg-modulus` must be a power of two, got {self.modulus!r}.")
        if self.modulus > MAX_MODULUS:
            raise ConfigError(f"`secagg-modulus` must be at most 2^32, got {self.modulus!r}.")
        self.check_sites(num_sites)
        if self.threshold:
            if self.threshold < 2:
                raise ConfigError(
                    f"`secagg-threshold` must be 0 (automatic) or >= 2, got {self.threshold!r}: "
                    "a threshold of 1 lets any single site reconstruct another's masks."
                )
            if self.threshold > num_sites:
                raise ConfigError(
                    f"`secagg-threshold` = {self.threshold} is above the number of sites "
                    f"(`num-sites` = {num_sites}): no round could ever be unmasked."
                )

    def check_sites(self, sampled: int) -> None:
        """Refuse a round whose ``sampled`` sites' quantized sum could wrap the modulus.

        Raises
        ------
        ConfigError
            If ``sampled * quantization_range >= modulus``.
        """
        if sampled * self.quantization_range >= self.modulus:
            raise ConfigError(
                f"{sampled} sites x `secagg-quantization-range` {self.quantization_range} reaches "
                f"`secagg-modulus` {self.modulus}: the masked sum would wrap around. Raise "
                "`secagg-modulus` or lower `secagg-quantization-range`."
            )

    def error_bound(self, site_sizes: Sequence[int]) -> float:
        """Largest difference, per value, between the secure and the plaintext weighted mean.

        Each site's scaled value is rounded to one of ``quantization_range`` levels over
        ``2 * clipping_range`` (error below one level), and its weight ``n / max_weight`` to a
        multiple of ``1 / quantization_range`` (error at most half of one).

        Parameters
        ----------
        site_sizes : Sequence[int]
            Training records of each site in the aggregate.
        """
        level = 2 * self.clipping_range / self.quantization_range
        total_weight = sum(site_sizes) / self.max_weight
        weight_error = 0.5 * self.max_weight / (self.quantization_range * min(site_sizes))
        return len(site_sizes) * level / total_weight + 2 * self.clipping_range * weight_error
