"""Automatic data curation (DINOv2 Sec. 3; ssl-data-curation for hierarchical k-means).

Pure functions over numpy arrays and faiss indexes; no object-store policy lives here (the stages
in ``dinoflow.stages.{embed,dedup,curate}`` own the I/O). Modules:

    unionfind   connected components of duplicate graphs
    knn         k-NN graphs with faiss (exact IndexFlatIP or IVF, chosen by pool size)
    hashing     exact content hash and 64-bit perceptual hash, near-exact pairs by Hamming distance
    dedup       components -> keep one per component; decontamination against evaluation sets
    retrieval   seed-based retrieval: top-N per query, or sampling from seed-holding k-means clusters
    hkmeans     hierarchical k-means with resampling and balanced top-down sampling
    copydetect  pixel copy detection against evaluation sets (crops, rotations, mirror, captions)
    descriptors L2 normalisation and the training-free pixel descriptor

The embedding shards these functions read and write are a data-plane format (dinoflow.data.embeddings).
"""
