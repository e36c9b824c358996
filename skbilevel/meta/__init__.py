"""skbilevel.meta."""
