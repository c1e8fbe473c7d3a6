//! Upstream query ids from the OS CSPRNG (RFC 5452 section 9.2: unpredictable ids), read in
//! blocks so that one `getrandom` call serves two thousand queries.

const BLOCK: usize = 4096;

#[derive(Debug)]
pub(super) struct IdSource {
    buf: Box<[u8; BLOCK]>,
    pos: usize,
}

impl IdSource {
    pub(super) fn new() -> Result<Self, getrandom::Error> {
        let mut s = IdSource {
            buf: Box::new([0; BLOCK]),
            pos: BLOCK,
        };
        s.refill()?;
        Ok(s)
    }

    fn refill(&mut self) -> Result<(), getrandom::Error> {
        getrandom::fill(&mut self.buf[..])?;
        self.pos = 0;
        Ok(())
    }

    pub(super) fn next_id(&mut self) -> Result<u16, getrandom::Error> {
        if self.pos + 2 > BLOCK {
            self.refill()?;
        }
        let id = u16::from_be_bytes([self.buf[self.pos], self.buf[self.pos + 1]]);
        // Used bytes are wiped so that a memory disclosure cannot replay past ids.
        self.buf[self.pos..self.pos + 2].fill(0);
        self.pos += 2;
        Ok(id)
    }

    /// 32 random bits (source-port slots, 0x20 case bits).
    pub(super) fn next_u32(&mut self) -> Result<u32, getrandom::Error> {
        let hi = self.next_id()?;
        let lo = self.next_id()?;
        Ok(u32::from(hi) << 16 | u32::from(lo))
    }
}
