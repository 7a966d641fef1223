"""Decoder models (Llama and Mixtral architectures) whose KV lives in the paged pool."""

from fabric.model.args import ModelArgs
from fabric.model.checkpoint import load_model, save_checkpoint
from fabric.model.llama import Transformer

__all__ = ["ModelArgs", "Transformer", "load_model", "save_checkpoint"]
