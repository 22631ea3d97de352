"""Code that both the coordinator and the sites must agree on."""
