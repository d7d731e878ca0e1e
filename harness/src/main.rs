mod cleanup;
mod delay_proxy;
mod guest_output;
mod histogram;
mod limits;
mod netns;

fn main() {}
