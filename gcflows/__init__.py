"""gcflows: consistency training, distillation and the generator-induced coupling."""
