"""Prompt tuning of frozen transformers (Lester et al. 2021): the softprompt engine from Python.

    import softprompt
    model = softprompt.Model.load("assets/models/all-MiniLM-L6-v2")
    adapter = model.train("assets/data/movie-reviews/train.tsv", output="runs/x",
                          dev="assets/data/movie-reviews/dev.tsv")
    print(model.evaluate(adapter, "assets/data/movie-reviews/test.tsv")["accuracy"])
"""

import os
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union, overload, Literal

import numpy
import numpy.typing

__version__: str

class Error(ValueError):
    """Bad input: a data row (file, line, field), an option, an adapter or model that does not fit."""

# A file path (.tsv, .csv, .jsonl), (text, label) pairs, a dict of columns, a pandas DataFrame,
# or rows as mappings (a Hugging Face datasets.Dataset).
Data = Union[
    str,
    os.PathLike[str],
    Sequence[Union[tuple[Any, ...], list[Any], str]],
    Mapping[str, Sequence[Any]],
    Iterable[Mapping[str, Any]],
    Any,
]

class Adapter:
    """A prompt-tuning adapter directory (softprompt's or PEFT's), loaded and checked."""

    @staticmethod
    def load(path: Union[str, os.PathLike[str]]) -> "Adapter": ...
    @property
    def prompt(self) -> numpy.typing.NDArray[numpy.float32]:
        """[num_virtual_tokens, token_dim], float32: a copy."""
    @property
    def labels(self) -> list[str]: ...
    @property
    def config(self) -> dict[str, Any]:
        """adapter_config.json and softprompt.json, as one dict."""
    @property
    def head(self) -> Literal["classify", "verbalizer", "generation"]: ...
    @property
    def tasks(self) -> list[str] | None:
        """A multitask adapter's task names (evaluate, predict and generate take one as task=...)."""
    @property
    def num_virtual_tokens(self) -> int: ...
    @property
    def path(self) -> pathlib.Path: ...

class Pieces(Iterator[str]):
    """The pieces of a streamed generation, as they are written."""

    def __iter__(self) -> "Pieces": ...
    def __next__(self) -> str: ...

class Model:
    """A frozen model (Hugging Face directory of BERT, GPT-2 or the Llama family, or a .gguf)."""

    @staticmethod
    def load(
        path: Union[str, os.PathLike[str]],
        keep_quantized: bool = False,
        dtype: Literal["f32", "bf16"] = "f32",
        threads: int | None = None,
    ) -> "Model": ...
    @property
    def architecture(self) -> Literal["bert", "gpt2", "llama"]: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def max_positions(self) -> int: ...
    @property
    def path(self) -> pathlib.Path: ...
    @property
    def threads(self) -> int: ...
    def train(
        self,
        train: Data,
        output: Union[str, os.PathLike[str]],
        dev: Data | None = None,
        *,
        task: Literal["classify", "verbalizer", "causal-lm"] | None = None,
        template: str | None = None,
        label_words: list[str] | None = None,
        num_virtual_tokens: int | None = None,
        method: Literal["prompt", "p-tuning", "residual", "prefix", "multitask"] | None = None,
        encoder: Literal["mlp", "lstm"] | None = None,
        encoder_hidden_size: int | None = None,
        prefix_projection: bool | None = None,
        task_rank: int | None = None,
        init: Literal["uniform", "normal", "vocab", "text", "labels"] | None = None,
        init_text: str | None = None,
        pool: Literal["first", "pooler", "cls", "mean", "last"] | None = None,
        optimizer: Literal["adamw", "adafactor"] | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        schedule: Literal["constant", "linear"] | None = None,
        warmup_steps: int | None = None,
        epochs: int | None = None,
        min_steps: int | None = None,
        max_steps: int | None = None,
        batch_size: int | None = None,
        padding_side: Literal["right", "left"] | None = None,
        max_grad_norm: float | None = None,
        eval_every: int | None = None,
        patience: int | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        task_column: str | None = None,
        label_column: str = "label",
        progress: bool = True,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        resume: bool = False,
    ) -> Adapter:
        """Trains a soft prompt (and the task's head) and writes the adapter to `output`.

        Options left None take the command line's defaults (`softprompt train --help`).
        Ctrl-C stops at the end of the step, checkpointed; resume=True continues exactly.
        """
    def evaluate(
        self,
        adapter: Union[Adapter, list[Adapter]],
        data: Data,
        *,
        task: str | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        batch_size: int = 32,
        padding_side: Literal["right", "left"] | None = None,
    ) -> dict[str, Any]:
        """accuracy, macro_f1, per_class, confusion, labels (a generation adapter: exact_match, token_accuracy, token_loss)."""
    def predict(
        self,
        adapter: Union[Adapter, list[Adapter]],
        texts: Union[Sequence[str], Data],
        *,
        task: str | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        batch_size: int = 32,
        padding_side: Literal["right", "left"] | None = None,
    ) -> list[dict[str, Any]]:
        """One {"label", "scores", "logits"} per text (an ensemble adds "members")."""
    @overload
    def generate(
        self,
        text: str,
        adapter: Adapter | None = None,
        *,
        task: str | None = None,
        template: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Union[str, list[str], None] = None,
        seed: int = 0,
        stream: Literal[False] = False,
    ) -> str: ...
    @overload
    def generate(
        self,
        text: str,
        adapter: Adapter | None = None,
        *,
        task: str | None = None,
        template: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Union[str, list[str], None] = None,
        seed: int = 0,
        stream: Literal[True],
    ) -> Pieces: ...
