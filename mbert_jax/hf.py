"""`mbert_jax.hf`: Hugging Face interop (`load`, `import_model`, `save`, `save_task`). The code is
mbert_jax/interop/hf_import.py and mbert_jax/interop/hf_export.py."""

from mbert_jax.interop.hf_export import (ARCHITECTURES, save, save_task, task_state_dict,
                                         to_state_dict)
from mbert_jax.interop.hf_import import Imported, import_model, load

__all__ = ["ARCHITECTURES", "Imported", "import_model", "load", "save", "save_task",
           "task_state_dict", "to_state_dict"]
