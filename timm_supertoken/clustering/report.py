"""A deep-clustering result as a table: what `timm-supertoken cluster` prints and bench_cluster.py publishes."""
from typing import Any, Dict

__all__ = ['results_markdown']


def results_markdown(result: Dict[str, Any]) -> str:
    """Baselines and rounds as one Markdown table (NMI/ARI/ACC, losses, time)."""
    lines = ['| | NMI | ARI | ACC | loss (eq. 8) | L_ViT | L_clust | time (s) |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for name, m in result['baselines'].items():
        if m:
            # the contrastive baseline's time is the representation stage's
            stage_s = f'{result["pretrain"]["time_s"]:.1f}' if name == 'kmeans_contrastive_embedding' else ''
            lines.append(f'| {name.replace("_", " ")} | {m["nmi"]:.4f} | {m["ari"]:.4f} | {m["acc"]:.4f} | | | | {stage_s} |')
    for r in result['rounds']:
        scores = ' | '.join(f'{r[key]:.4f}' if key in r else '-' for key in ('nmi', 'ari', 'acc'))
        lines.append(f'| round {r["round"]} | {scores} | {r["loss"]:.4f} | {r["loss_vit"]:.4f} '
                     f'| {r["loss_clustering"]:.3f} | {r["time_s"]:.1f} |')
    return '\n'.join(lines)
