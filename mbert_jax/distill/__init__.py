"""Knowledge transfer: the pretraining/distillation task (`task`), its pure losses (`losses`), the
staged schedules (`schedule`), the teacher and how it teaches a student of another shape
(`teacher`), and cached teacher logits (`teacher_cache`)."""
