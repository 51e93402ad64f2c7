"""The server side: the federation of sites, event intake, model checkpoints and the receiver base."""
