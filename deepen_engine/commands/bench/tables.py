"""The text tables of `deepen bench` (without `--json`): the sections measured in one run,
and the constraint's cost. The serving and Ray benchmarks print their own (serving.py,
ray.py).
"""

from __future__ import annotations

from typing import Any

from .speculative import speculative_table


def constraint_table(f: dict[str, Any]) -> str:
    """ms/token with and without a constraint, one row per main member."""
    c = f["constraint"]
    lines = [f"ms per token, {c['new_tokens']} new tokens, batch 1 (medians)"]
    head = f"{'main':24}{'free':>8}{'any text':>10}{'json':>8}{'+any':>8}{'+json':>8}{'mask':>7}"
    lines.append(head)
    for r in c["rows"]:
        lines.append(
            f"{r['main']:24}{r['free_ms_per_token']:>8.1f}{r['any_text_ms_per_token']:>10.1f}"
            f"{r['json_schema_ms_per_token']:>8.1f}{r['overhead_any_text']:>8.1%}"
            f"{r['overhead_json_schema']:>8.1%}{r['mask_ms_per_token']:>7.2f}"
        )
    return "\n".join(lines)


def print_table(f: dict[str, Any]) -> None:
    """Every section measured, as tables and lines of text."""
    print(f"members {' + '.join(f['members'])} (main {f['main']}), {f['dtype']} on {f['device']}")
    print("\nms per decoding step (one token per row)")
    names = f["members"]
    head = "".join(f"{n[:18]:>20}" for n in names)
    print(
        f"{'batch':>5}{head}{'sum':>9}{'ensemble':>10}{'ratio':>7}{'non-forward':>13}{'fusion':>8}"
    )
    for r in f["speed"]["rows"]:
        alone = "".join(f"{r['members_alone_ms'][n]:>20.1f}" for n in names)
        print(
            f"{r['batch_size']:>5}{alone}{r['sum_of_members_ms']:>9.1f}{r['ensemble_ms']:>10.1f}"
            f"{r['ratio_ensemble_to_sum']:>7.2f}{r['fusion_only_share']:>13.1%}{r['fuse_share']:>8.1%}"
        )
    print("\nms per token after N new tokens (batch 1)")
    print(f"{'N':>6}{'ensemble':>10}{'re-encode':>11}{'sum alone':>11}")
    for p in f["length"]["curve"]:
        print(
            f"{p['new_tokens']:>6}{p['ensemble_ms']:>10.1f}{p['reencode_baseline_ms']:>11.1f}"
            f"{p['sum_of_members_ms']:>11.1f}"
        )
    print(f"speed-up over re-encoding: {f['length']['speedup_over_reencode']}")
    m = f["memory"]
    print(
        f"\npeak RSS {m['peak_rss_mb']:.0f} MiB ({m['peak_rss_above_start_mb']:.0f} above start); "
        f"weights + KV caches + relative space {m['weights_caches_relative_mb']:.0f} MiB"
    )
    fid = f["fidelity"]
    if fid["steps"]:
        print(
            f"fidelity: fast path = reference on {fid['agreeing_steps']}/{fid['steps']} steps "
            f"({fid['agreement']:.1%}); left-out mass <= {fid['leftout_mass_bound']}"
        )
    cold = f["speed"]["cold_run"]
    print(
        f"first request of the process: {cold['cold_over_warm']:.2f}x a warm one "
        f"({cold['rows_computed']} relative rows computed, {cold['rows_from_disk']} from disk)"
    )
    for g in f.get("gate", {}).get("runs", []):
        print(
            f"gate {g['method']:>6} {g['gate']:>9}: skipped {g['gated_share']:.1%} of "
            f"row-steps, fusion time saved {g['fuse_seconds_saved_share']:.1%}, "
            f"{g['rows_same_tokens_as_off']}/{g['rows']} rows as without the gate"
        )
    if "constraint" in f:
        print("\n" + constraint_table(f))
    if "speculative" in f:
        print("\n" + speculative_table(f))
    if "plot" in f:
        print(f"plot: {f['plot']}")
