"""Knowledge transfer, from config to loss:

- `task`: the pretraining/distillation task of the loop (`PretrainTask`; `design` builds its
  programs from configs alone); `config`: its checks, optimizer, stages and run identity;
  `objective`: what one stage computes (student and teacher forwards, weighted terms, eval);
- `losses` (MLM, NSP, knowledge distillation, the layer-wise sum), `feature_losses`,
  `attention_losses`, `loss_utils`: pure functions of model outputs;
- `schedule` (presets, stage lists, learning-rate multipliers) and `stage` (one stage's
  weights, layers and learning rate); `transfer_options` (the `kt` options and layer maps);
- `teacher`: loading a teacher and planning how it teaches a student of another shape;
- `teacher_cache` (`cache_config`, `cache_format`, `cache_reader`, `cache_writer`): top-k
  teacher logits written once and read by the pre-training distillation stage.
"""
