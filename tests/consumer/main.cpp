// Consumer smoke test: loads a HF model directory through the installed headers and prints
// its layer count. Exit status 0 on success, 1 on a cacheshrink::Error, 2 on bad usage.
#include <cacheshrink/io/safetensors.hpp>
#include <cacheshrink/model/weights.hpp>
#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " MODEL_DIR\n";
    return 2;
  }
  try {
    const auto m = cacheshrink::model::load_model(argv[1]);
    std::cout << "layers: " << m.config.n_layers << "\n"
              << "parameters: " << cacheshrink::model::parameter_count(m.weights) << "\n";
  } catch (const cacheshrink::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
