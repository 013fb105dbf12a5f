"""The paper's Frozen Lake experiment (§5.3, Appendix B.2):
``pip install -e '.[frozenlake]'``, then ``ift frozenlake``."""
