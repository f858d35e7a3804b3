"""FLOPs and minimum bytes of each op at the benchmark shapes, and the time they imply.

Counts follow the usual conventions: a multiply-add is 2 FLOPs; attention backward costs 2.5x
its forward (dQ, dK, dV and the recomputed scores), so forward+backward is 3.5x; an MLP's
backward costs 2x its forward. "Minimum bytes" is what an ideal fused kernel must read and
write at least once (inputs, weights, outputs, and for the backward their gradients), in the
op's dtype. Ceilings are the H100 figures measured in docs/design.md §3.
"""

from dataclasses import dataclass

H100_BF16_FLOPS = 777e12
H100_COPY_BYTES_PER_S = 3.0e12


@dataclass(frozen=True)
class Roofline:
    op: str
    shape: str
    pass_: str
    flops: float
    min_bytes: float

    def time_at(self, flops_per_s: float = H100_BF16_FLOPS, bytes_per_s: float = H100_COPY_BYTES_PER_S) -> float:
        """Lower bound in seconds: the larger of the compute time and the memory time."""
        return max(self.flops / flops_per_s, self.min_bytes / bytes_per_s)


def moe_mlp_roofline(T: int, d: int, h: int, E: int, k: int, elem: int = 2, backward: bool = True) -> Roofline:
    """Grouped expert MLP over T·k (token, expert) pairs, all kept."""
    fwd = 2 * T * k * (d * h + h * d)
    weights = E * (d * h + h + h * d + d) * elem
    tokens = 2 * T * d * elem + T * k * 8  # x in, y out, routing weights/indices
    if not backward:
        return Roofline("moe_mlp", f"T={T} d={d} h={h} E={E} k={k}", "fwd", fwd, weights + tokens)
    return Roofline("moe_mlp", f"T={T} d={d} h={h} E={E} k={k}", "fwd+bwd", 3 * fwd, 3 * weights + 2 * tokens)


def readin_attention_roofline(B: int, U: int, V: int, H: int, C: int, Din: int, elem: int = 2, backward: bool = True) -> Roofline:
    """Folded read-in: attention of H·U queries of width Din over V shared keys=values, plus projections."""
    attention = 4 * B * H * U * V * Din
    projections = 2 * (2 * B * U * H * C * Din)
    data = (B * V * Din + 2 * B * U * H * C) * elem + 2 * H * C * Din * elem
    shape = f"B={B} U={U} V={V} H={H} C={C} Din={Din}"
    if not backward:
        return Roofline("readin_attention", shape, "fwd", attention + projections, data)
    return Roofline("readin_attention", shape, "fwd+bwd", 3.5 * attention + 3 * projections, 2 * data)


def graph_attention_roofline(B: int, H: int, U: int, V: int, C: int, density: float, S: int = 64, elem: int = 2, backward: bool = True) -> Roofline:
    """Sparse attention over the kept fraction `density` of the U×V edges, affinities on the fly."""
    attention = 4 * B * H * U * V * C * density
    affinity = 2 * U * V * S
    data = (2 * B * H * U * C + 2 * B * H * V * C) * elem + (U + V) * S * 4
    shape = f"B={B} H={H} U={U} V={V} C={C} density={density}"
    if not backward:
        return Roofline("graph_attention", shape, "fwd", attention + affinity, data)
    return Roofline("graph_attention", shape, "fwd+bwd", 3.5 * attention + 3 * affinity, 2 * data)


def benchmark_shapes() -> list[Roofline]:
    """The docs/design.md §3 GPU benchmark shapes, bf16, forward and forward+backward."""
    rows = []
    for backward in (False, True):
        rows.append(moe_mlp_roofline(25216, 768, 3072, 8, 2, backward=backward))
        rows.append(readin_attention_roofline(128, 64, 64, 6, 64, 256, backward=backward))
        rows.append(readin_attention_roofline(128, 192, 784, 8, 64, 320, backward=backward))
        rows.append(graph_attention_roofline(128, 6, 256, 320, 64, 0.22, backward=backward))
        rows.append(graph_attention_roofline(64, 8, 768, 960, 64, 0.22, backward=backward))
    return rows


def markdown_table(rows: list[Roofline]) -> str:
    lines = [
        "| op | shape | pass | GFLOP | min MB | compute-bound ms | memory-bound ms | limit ms |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        compute_ms = r.flops / H100_BF16_FLOPS * 1e3
        memory_ms = r.min_bytes / H100_COPY_BYTES_PER_S * 1e3
        lines.append(
            f"| {r.op} | {r.shape} | {r.pass_} | {r.flops / 1e9:.1f} | {r.min_bytes / 1e6:.1f} | "
            f"{compute_ms:.3f} | {memory_ms:.3f} | {r.time_at() * 1e3:.3f} |"
        )
    return "\n".join(lines)
