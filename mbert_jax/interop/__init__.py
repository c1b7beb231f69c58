"""Leaving and entering mbert-jax: the one loader of runs and Hugging Face directories
(`model_source`), Hugging Face import and export (`hf_import`, `hf_export`, sharing the tensor
name table of `hf_names`), run exports (`export`, file names in `export_files`), ONNX and int8
(`onnx_export`), and inference on exports (`predict`)."""
