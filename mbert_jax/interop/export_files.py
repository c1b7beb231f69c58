"""File names of an export directory (`python -m mbert_jax.export`), which `predict` reads back.
A Hugging Face export uses Hugging Face's own names (`hf_names`) and the tokenizer files
(`mbert_jax.data.tokenizer.TOKENIZER_FILES`)."""

CARD_FILE = "README.md"                  # every export: the model card
TASK_FILE = "task.json"                  # fine-tuned models: what `predict` needs to encode
                                         # inputs and read outputs
MODEL_CONFIG_FILE = "model_config.json"  # flax and onnx exports: the ModelConfig
FLAX_PARAMS_FILE = "params.safetensors"  # flax exports: parameters under flattened '/' keys
ONNX_FILE = "model.onnx"                 # onnx exports: the graph
IO_FILE = "onnx_io.json"                 # onnx exports: input/output names and shapes
