"""skbilevel.reweighting."""
