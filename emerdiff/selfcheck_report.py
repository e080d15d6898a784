"""The self-check's report: each check's figure against its threshold, as DIR/selfcheck.json and
DIR/selfcheck.md, and the lines the tool prints."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .files import version_record
from .profiling import STAGES

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
BUG_REPORT = (
    "Please open an issue with DIR/selfcheck.json and DIR/selfcheck.md attached, the exact command line, "
    "the config files it used, and the output of "
    "`pip list | grep -i -E 'torch|diffusers|faiss|transformers'`."
)


@dataclass
class Check:
    """One check: its figure against its threshold ("<=" or ">="), and pass / fail / skipped."""

    name: str
    what: str
    status: str
    figure: float | None = None
    threshold: float | None = None
    compare: str = "<="
    detail: str = ""

    @classmethod
    def measured(
        cls, name: str, what: str, figure: float, threshold: float, compare: str = "<=", detail: str = ""
    ) -> Check:
        ok = figure <= threshold if compare == "<=" else figure >= threshold
        return cls(name, what, PASS if ok and np.isfinite(figure) else FAIL, float(figure), threshold, compare, detail)

    @classmethod
    def skipped(cls, name: str, what: str, reason: str) -> Check:
        return cls(name, what, SKIPPED, detail=f"skipped: {reason}")


@dataclass
class SelfCheckReport:
    environment: dict[str, Any]
    settings: dict[str, Any]
    checks: list[Check]
    timing: dict[str, Any] = field(default_factory=dict)
    preset: dict[str, Any] = field(default_factory=dict)  # the approximate preset against the exact path

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failed

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failed": [c.name for c in self.failed],
            "environment": self.environment,
            "settings": self.settings,
            "checks": [asdict(c) for c in self.checks],
            "timing": self.timing,
            "preset": self.preset,
        }

    def to_markdown(self) -> str:
        env = "\n".join(f"| {k} | {v} |" for k, v in self.environment.items())
        rows = "\n".join(
            f"| {c.name} | {c.what} | {_fmt(c.figure)} | {_threshold(c)} | **{c.status}** | {c.detail} |"
            for c in self.checks
        )
        t = self.timing
        stages = (
            "\n".join(
                f"| {s} | {t['seconds'].get(s, 0):.3f} | {t['extrapolated_seconds'].get(s, 0):.3f} |" for s in STAGES
            )
            if t
            else ""
        )
        verdict = "all checks passed" if self.passed else f"FAILED: {', '.join(c.name for c in self.failed)}"
        text = [
            f"# EmerDiff self-check: {verdict}",
            "",
            "## Environment",
            "",
            "| | |",
            "|---|---|",
            env,
            "",
            "## Checks",
            "",
            "| check | what | figure | threshold | status | detail |",
            "|---|---|---|---|---|---|",
            rows,
            "",
        ]
        if t:
            text += [
                "## Time per image",
                "",
                f"Measured with K = {t['measured_masks']} masks; extrapolated to K = {t['default_masks']} "
                "(the stages that grow with the masks scaled linearly).",
                "",
                f"| stage | s measured | s at K = {t['default_masks']} |",
                "|---|---|---|",
                stages,
                f"| **total** | {t['total_seconds']:.3f} | {t['extrapolated_total_seconds']:.3f} |",
                "",
                f"Images per second at K = {t['default_masks']}: **{t['images_per_second']:.3g}**",
                "",
            ]
        if self.preset:
            text += [
                f"## Approximate preset (--cfg {self.preset['name']})",
                "",
                preset_line(self.preset),
                "",
                "The preset's bounds were measured on a miniature model trained on the toy world "
                "(docs/benchmarks.md); this line is the measurement on these weights and this image.",
                "",
            ]
        if not self.passed:
            text += ["## What to do", "", BUG_REPORT, ""]
        return "\n".join(text)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _threshold(check: Check) -> str:
    """The check's bound as written in the reports, e.g. "<= 0.0001"; empty without one."""
    return "" if check.threshold is None else f"{check.compare} {_fmt(check.threshold)}"


def preset_line(preset: dict[str, Any]) -> str:
    """The preset's agreement with the exact path, its speed-up and whether it holds on these weights."""
    verdict = (
        "holds on these weights" if preset["holds"] else "does NOT hold on these weights: segment with the exact path"
    )
    return (
        f"preset {preset['name']}: {100 * preset['agreement']:.1f} % of pixels labelled as on the exact path "
        f"(holds at >= {100 * preset['agreement_floor']:.0f} %), {preset['speedup']:.2f}x faster "
        f"({preset['exact_seconds']:.2f} s -> {preset['preset_seconds']:.2f} s): {verdict}"
    )


def write_report(report: SelfCheckReport, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    record = version_record("selfcheck") | report.to_dict()
    (output / "selfcheck.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (output / "selfcheck.md").write_text(report.to_markdown())


def summary(report: SelfCheckReport, output: Path) -> str:
    """What the tool prints at the end: every check's line, then the verdict and, on failure, the bug-report advice."""
    lines = [
        f"{c.status.upper():8} {c.name}: {_fmt(c.figure)} {_threshold(c)} {c.detail}".rstrip() for c in report.checks
    ]
    t = report.timing
    if t:
        lines.append(
            f"time per image at K = {t['default_masks']}: {t['extrapolated_total_seconds']:.2f} s "
            f"({t['images_per_second']:.3g} images/s)"
        )
    if report.preset:
        lines.append(preset_line(report.preset))
    if report.passed:
        lines.append(f"self-check passed; report in {output / 'selfcheck.md'}")
    else:
        lines.append(f"self-check FAILED: {', '.join(c.name for c in report.failed)} (see {output / 'selfcheck.md'}).")
        lines.append(BUG_REPORT.replace("DIR/", f"{output}/"))
    return "\n".join(lines)
