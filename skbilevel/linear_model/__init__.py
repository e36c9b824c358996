"""skbilevel.linear_model."""
