"""qinco-jax: QINCo and IVF-QINCo in JAX."""
