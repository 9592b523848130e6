"""jobs: job specs, their inputs, the fan-out onto Ray and the jobs themselves (tune, sequential, results)."""
