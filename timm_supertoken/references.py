"""The papers the package cites in what it publishes (model cards, timm cfgs), written once."""
from dataclasses import dataclass
from typing import Tuple

__all__ = ['Paper', 'SUPER_TOKEN_PAPER', 'ARCHITECTURE_PAPERS', 'TIMM_CITATION']


@dataclass(frozen=True)
class Paper:
    """A journal paper's bibliographic record."""
    title: str
    authors: Tuple[str, ...]
    journal: str
    volume: int
    number: int
    pages: str
    year: int
    doi: str

    @property
    def url(self) -> str:
        return f'https://doi.org/{self.doi}'

    @property
    def timm_paper_id(self) -> str:
        """The form timm's `pretrained_cfg['paper_ids']` uses ('arXiv:…', 'DOI:…')."""
        return f'DOI:{self.doi}'

    def bibtex(self, key: str) -> str:
        """A BibTeX @article entry for model cards."""
        fields = [('title', self.title), ('author', ' and '.join(self.authors)), ('journal', self.journal),
                  ('volume', self.volume), ('number', self.number), ('pages', self.pages), ('year', self.year),
                  ('doi', self.doi), ('note', 'In Korean')]
        body = ',\n'.join(f'  {name} = {{{value}}}' for name, value in fields)
        return f'@article{{{key},\n{body}\n}}'


# The embedding paper (Chonnam National University), as printed in J. DCS 25(2), Feb 2024; its Korean title is
# in docs/design.md. The clustering paper names no venue or DOI, so nothing is published with it.
SUPER_TOKEN_PAPER = Paper(
    title='Lightweight ViT Convolutional Embedding Module Based on Super-Token Clustering',
    authors=('Jin Lee', 'Ju-Hwan Lee', 'Jin-Young Kim'),
    journal='Journal of Digital Contents Society',
    volume=25,
    number=2,
    pages='485--494',
    year=2024,
    doi='10.9728/dcs.2024.25.2.485',
)

# The works the embedding paper builds on, cited by their arXiv records on model cards as timm's cards do:
# the ViT trunk ([2] in the paper), EarlyConv's stem ([6]) and SViT's super-token clustering ([11]).
ARCHITECTURE_PAPERS = {
    'An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale': 'https://arxiv.org/abs/2010.11929',
    'Early Convolutions Help Transformers See Better': 'https://arxiv.org/abs/2106.14881',
    'Vision Transformer with Super Token Sampling': 'https://arxiv.org/abs/2211.11167',
}

TIMM_CITATION = """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}"""
