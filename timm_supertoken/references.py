"""The two papers this package implements, cited from one place: model cards, timm cfgs and docs take them here."""
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ['Paper', 'SUPER_TOKEN_PAPER', 'DEEP_CLUSTERING_PAPER', 'TIMM_CITATION']


@dataclass(frozen=True)
class Paper:
    """A paper's bibliographic record; `doi` is None where none is known."""
    title: str
    title_ko: str
    authors: Tuple[str, ...]
    venue: Optional[str] = None
    year: Optional[int] = None
    doi: Optional[str] = None
    volume: Optional[int] = None
    number: Optional[int] = None
    pages: Optional[str] = None

    @property
    def url(self) -> Optional[str]:
        return f'https://doi.org/{self.doi}' if self.doi else None

    @property
    def timm_paper_id(self) -> Optional[str]:
        """The form timm's `pretrained_cfg['paper_ids']` uses ('arXiv:…', 'DOI:…')."""
        return f'DOI:{self.doi}' if self.doi else None

    def bibtex(self, key: str) -> str:
        """A BibTeX @article entry for model cards."""
        fields = [('title', self.title), ('author', ' and '.join(self.authors)), ('journal', self.venue),
                  ('volume', self.volume), ('number', self.number), ('pages', self.pages), ('year', self.year),
                  ('doi', self.doi), ('note', 'In Korean')]
        body = ',\n'.join(f'  {name} = {{{value}}}' for name, value in fields if value is not None)
        return f'@article{{{key},\n{body}\n}}'


# The embedding paper, as printed in J. DCS 25(2), Feb 2024 (Chonnam National University).
SUPER_TOKEN_PAPER = Paper(
    title='Lightweight ViT Convolutional Embedding Module Based on Super-Token Clustering',
    title_ko='슈퍼토큰 클러스터링 기반 ViT 합성곱 임베딩 모듈 경량화',
    authors=('Jin Lee', 'Ju-Hwan Lee', 'Jin-Young Kim'),
    venue='Journal of Digital Contents Society',
    year=2024,
    doi='10.9728/dcs.2024.25.2.485',
    volume=25,
    number=2,
    pages='485--494',
)

# The clustering paper (Sookmyung Women's University); its text names no venue, year or DOI.
DEEP_CLUSTERING_PAPER = Paper(
    title='Deep Clustering Based on Vision Transformer (ViT) for Images',
    title_ko='이미지에 대한 비전 트랜스포머(ViT) 기반 딥 클러스터링',
    authors=('Hyesoo Shin', 'Sara Yu', 'Ki Yong Lee'),
)

TIMM_CITATION = """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}"""
