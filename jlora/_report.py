"""What ``inject`` did (:class:`Report`) and what the fused matmul path did (:class:`FusedReport`)."""

from __future__ import annotations

import dataclasses

__all__ = ["FusedReport", "Report"]


@dataclasses.dataclass
class Report:
    """What ``inject`` adapted, how it chose, and what it left alone and why (``apply.report``).

    Example:
        >>> print(Report(adapted=[("w", (4, 3), "in=[0] out=[1]")], skipped=[], trained=[], rank=2,
        ...              scale=1.0, trainable=14, total=12, rule="2-D leaves"))
        jlora: adapted 1 kernels with rank 2, scale 1 (chosen: 2-D leaves)
          + w [4, 3] (in=[0] out=[1])
        trainable params: 14 || all params: 12 || trainable%: 116.6667
    """

    adapted: list[tuple[str, tuple[int, ...], str]]  # (path, shape, layout)
    skipped: list[tuple[str, tuple[int, ...], str]]  # (path, shape, reason)
    trained: list[str]  # leaves trained in full
    rank: int | str  # "per module" with rank patterns
    scale: float | str
    trainable: int
    total: int
    rule: str = ""  # how candidates were chosen (traced uses, or the 2-D convention)
    variant: str = ""  # e.g. "DoRA, init pissa"

    def __str__(self) -> str:
        how = f" (chosen: {self.rule})" if self.rule else ""
        scale = f"{self.scale:g}" if isinstance(self.scale, (int, float)) else self.scale
        var = f", {self.variant}" if self.variant else ""
        lines = [f"jlora: adapted {len(self.adapted)} kernels with rank {self.rank}, scale {scale}{var}{how}"]
        lines += [f"  + {p} {list(s)} ({lay})" for p, s, lay in self.adapted]
        lines += [f"  * {p} (trained in full)" for p in self.trained]
        lines += [f"  - {p} {list(s)}: {why}" for p, s, why in self.skipped]
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                     f"trainable%: {pct:.4f}")
        return "\n".join(lines)


@dataclasses.dataclass
class FusedReport:
    """Which adapted matmuls of the last traced call took the fused kernel, and why the others did
    not (``apply.fused_report``, with ``inject(..., matmul="pallas")``).

    Example:
        >>> print(FusedReport([("q", None), ("k", "quantized base")]))
        jlora fused_matmul: 1 of 2 adapted matmuls fused
          - 1 plain: quantized base (k)
    """

    matmuls: list[tuple[str, str | None]]  # (kernel path, None if fused else the reason), distinct

    @property
    def fused(self) -> int:
        return sum(why is None for _, why in self.matmuls)

    def __str__(self) -> str:
        lines = [f"jlora fused_matmul: {self.fused} of {len(self.matmuls)} adapted matmuls fused"]
        plain: dict[str, list[str]] = {}
        for path, why in self.matmuls:
            if why is not None:
                plain.setdefault(why, []).append(path)
        for why, paths in plain.items():
            lines.append(f"  - {len(paths)} plain: {why} ({', '.join(dict.fromkeys(paths))})")
        return "\n".join(lines)
