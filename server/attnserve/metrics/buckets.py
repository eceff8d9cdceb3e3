"""Histogram bucket boundaries (upper bounds) of attnserve's metrics.

The serving families follow vLLM's (vllm/v1/metrics/buckets.py) so dashboards and SLOs written
for vLLM read the same here.
"""

REQUEST_LATENCY_SECONDS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

# Also used for queue time: on a lightly loaded server requests wait milliseconds, which the
# request-latency family (from 0.3 s) cannot resolve.
TIME_TO_FIRST_TOKEN_SECONDS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip

INTER_TOKEN_LATENCY_SECONDS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


# One denoising step of a batch (one UNet call for all its rows): milliseconds on a GPU for
# small images, seconds on a CPU.
DENOISING_STEP_SECONDS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    20.0, 40.0,
)  # fmt: skip


def one_two_five(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count series)."""
    bounds: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(bounds)
            bounds.append(float(mantissa * scale))
        scale *= 10


# vLLM caps this series at the model's max length; one server hosts several models, so the
# cap is the longest context any of them is likely to have.
REQUEST_TOKENS: tuple[float, ...] = one_two_five(200_000)

RATIO: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

HIDDEN_SINKS_PER_HEAD: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)

#: eps predictions are about unit-variance noise, so their differences' RMS sits in (0, ~2].
GUIDANCE_NORM: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
