"""The model registry's services, one module per job you can name (docs/architecture.md): tokenizers, conversions (the
engine as a subprocess, zips), the registry of models and evaluations, imports and merges, and the demo data."""

from .conversions import (ENGINE_TIMEOUT_S, download_choices, download_name, format_file, gguf_support,
                          gguf_zip, hf_zip, lora_zip, run_engine)
from .demo import install_demo_data
from .imports import _extract_zip, import_model, merge_lora
from .registry import (delete_model, evaluation_table, final_metrics, lineage, loss_thumbnail, model_references,
                       next_version, record_evaluation, register_job_output, start_evaluation, update_model)
from .tokenizers import (MINIMIND_IDS, _tokenizer_dir, check_tokenizer_files, delete_tokenizer, encode,
                         register_tokenizer, start_tokenizer_training, tokenizer_references, train_tokenizer_now,
                         upload_tokenizer, vocab_size_of)

__all__ = [
    "check_tokenizer_files", "delete_tokenizer", "encode", "MINIMIND_IDS", "register_tokenizer",
    "start_tokenizer_training", "tokenizer_references", "_tokenizer_dir", "train_tokenizer_now", "upload_tokenizer",
    "vocab_size_of",
    "download_choices", "download_name", "ENGINE_TIMEOUT_S", "format_file", "gguf_support", "gguf_zip", "hf_zip",
    "lora_zip", "run_engine", "delete_model",
    "evaluation_table", "final_metrics", "lineage", "loss_thumbnail", "model_references", "next_version",
    "record_evaluation", "register_job_output", "start_evaluation", "update_model", "_extract_zip", "import_model",
    "merge_lora", "install_demo_data"
]
