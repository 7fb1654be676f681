"""Testing utilities that ship with treegrpo: a tiny random policy (:mod:`treegrpo.testing.tiny`)
and a stand-in SGLang server over the embedded engine (:mod:`treegrpo.testing.sglang_standin`).

Nothing here is imported by ``import treegrpo``; the modules need torch and transformers."""
