"""The training loop shared by the teacher and the students: input (memory or stream), student, losses, checkpoints."""
