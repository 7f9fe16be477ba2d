"""A deep-clustering result as a table: what `timm-supertoken cluster` prints and bench_cluster.py publishes."""
from typing import Any, Dict

__all__ = ['results_markdown']


def results_markdown(result: Dict[str, Any]) -> str:
    """Baselines and rounds as one Markdown table (NMI/ARI/ACC, losses, time).

    A round's loss is eq. 8's L_ViT + γ·L_clust, plus NT-Xent in the default rounds (blank in the paper's).
    """
    lines = ['| | NMI | ARI | ACC | loss | NT-Xent | L_ViT | L_clust | time (s) |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for name, m in result['baselines'].items():
        if 'nmi' in m:  # scored only against labels
            # a baseline's time is that of the stage it reads out: the contrastive stage, or the UMAP readout
            seconds = f'{m["time_s"]:.1f}' if 'time_s' in m else ''
            lines.append(f'| {name.replace("_", " ")} | {m["nmi"]:.4f} | {m["ari"]:.4f} | {m["acc"]:.4f} | | | | | {seconds} |')
    for r in result['rounds']:
        scores = ' | '.join(f'{r[key]:.4f}' if key in r else '-' for key in ('nmi', 'ari', 'acc'))
        contrastive = f'{r["loss_contrastive"]:.4f}' if 'loss_contrastive' in r else ''
        lines.append(f'| round {r["round"]} | {scores} | {r["loss"]:.4f} | {contrastive} | {r["loss_vit"]:.4f} '
                     f'| {r["loss_clustering"]:.3f} | {r["time_s"]:.1f} |')
    return '\n'.join(lines)
