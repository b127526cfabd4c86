"""Media: probing and decoding clips and images, static intro/outro trimming, letterbox crops,
and generated clips with known ground truth (`wanlora.media.synth`)."""
