"""skbilevel.distillation."""
