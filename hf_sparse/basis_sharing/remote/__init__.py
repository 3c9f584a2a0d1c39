"""The files shipped inside a compressed Basis Sharing model folder (transformers remote code).

They import only torch and transformers, so a folder loads where hf_sparse is not installed;
``hf_sparse.basis_sharing.compressed`` registers the same classes with the Auto classes.
"""
