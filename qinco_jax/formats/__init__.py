"""Files: every format the library reads or writes, and how it writes them safely.

    torch_pickle   PyTorch `.pt` files without PyTorch (zip + pickle, storages)
    qinco2_file    QINCo2's `.pt` checkpoints (dicts of tensors and parameters)
    state_dict     the reference's parameter names and layouts <-> our parameter pytree
    checkpoint     load / save a model: reference `.pt` files and orbax model directories
    code_parts     encoded vectors in QINCo2's format (a header `.npz` + `.part_<i>.npz`)
    vecs_io        the ANN benchmarks' vector files (fvecs, bvecs, ivecs, fbin, u8bin, npy)
    packing        codes packed into bit strings, byte for byte as faiss
    io             atomic writes: a temporary name, then a rename
"""
