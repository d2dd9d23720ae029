"""Data: the data sets and the checks on every vector that enters the library.

    datasets     the reference's data sets (BigANN, Deep1B, folders, built-in synthetic sets)
    image_sift   the built-in real data set: dense SIFT of scikit-image's sample images
    groundtruth  exact nearest-neighbour ground truth (faiss brute force)
    training_set the training file's train / validation split, IVF centroid files
    validation   checks on vectors (dtype, shape, finite values) and faiss steps' errors
"""
